//! Generations of the embedded read models, for blue/green rebuilds.
//!
//! Generation 0 lives at the data dir's top (`readmodel.redb`, `search/`); generation N ≥ 1 in
//! `generations/gN/`. `generations.json` names the live one, the previous one kept for
//! rollback, and one being built. It is replaced atomically (write, fsync, rename), so a crash
//! leaves either the old pointer or the new one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

const POINTER: &str = "generations.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// The generation readers use.
    pub live: u32,
    /// The generation readers used before the last switch, kept until `--drop-old`.
    pub previous: Option<u32>,
    /// A rebuild in progress (or interrupted); running `callisto replay` again resumes it.
    pub building: Option<u32>,
}

impl Generations {
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(POINTER);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join(POINTER);
        let tmp = data_dir.join(format!("{POINTER}.tmp"));
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(self)?)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()?;
        Ok(())
    }

    /// The number a new rebuild gets.
    pub fn next(&self) -> u32 {
        [Some(self.live), self.previous, self.building].into_iter().flatten().max().unwrap_or(0) + 1
    }
}

/// Where generation `generation`'s read models live.
pub fn dir(data_dir: &Path, generation: u32) -> PathBuf {
    if generation == 0 { data_dir.to_path_buf() } else { data_dir.join("generations").join(format!("g{generation}")) }
}

/// Deletes a generation's files (never generation 0's directory itself, which is the data dir).
pub fn remove(data_dir: &Path, generation: u32) -> anyhow::Result<()> {
    let dir = dir(data_dir, generation);
    if generation == 0 {
        let _ = std::fs::remove_file(dir.join("readmodel.redb"));
        let _ = std::fs::remove_dir_all(dir.join("search"));
    } else if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
