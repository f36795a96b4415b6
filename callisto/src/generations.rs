//! Generations of the embedded read models, for blue/green rebuilds.
//!
//! Generation 0 lives at the data dir's top (`readmodel.redb`, `search/`); generation N ≥ 1 in
//! `generations/gN/`. `generations.json` names the live one, the previous one kept for
//! rollback, and one being built. It is replaced atomically (write, fsync, rename), so a crash
//! leaves either the old pointer or the new one. MongoDB and Elasticsearch keep theirs on the
//! server (`callisto_core::readmodel::{mongo, elastic}`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use callisto_core::readmodel::StoreError;
use callisto_core::readmodel::generations::GenerationPointer;
pub use callisto_core::readmodel::generations::Generations;

const POINTER: &str = "generations.json";

/// `generations.json` in a data dir.
pub struct FilePointer {
    pub data_dir: PathBuf,
}

impl FilePointer {
    pub fn load(&self) -> anyhow::Result<Generations> {
        let path = self.data_dir.join(POINTER);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Generations::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, generations: &Generations) -> anyhow::Result<()> {
        let path = self.data_dir.join(POINTER);
        let tmp = self.data_dir.join(format!("{POINTER}.tmp"));
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(generations)?)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.data_dir)?.sync_all()?;
        Ok(())
    }
}

#[async_trait]
impl GenerationPointer for FilePointer {
    async fn load(&self) -> Result<Generations, StoreError> {
        FilePointer::load(self).map_err(|e| StoreError::Unavailable(format!("{e:#}")))
    }

    async fn save(&self, next: &Generations) -> Result<(), StoreError> {
        FilePointer::save(self, next).map_err(|e| StoreError::Unavailable(format!("{e:#}")))
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
