//! Schema evolution: the current schemas must stay compatible with every released version.
//!
//! Released copies live in `schemas/released/vN/`. Callisto's topics are replayed from offset 0
//! by new code (so new readers must read old data: *backward*) while consumers deploy
//! independently of writers (so old readers must read new data: *forward*). Both together are
//! Confluent's `FULL_TRANSITIVE`, checked here with Avro's own resolution rules.

use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;

use crate::schemas::EventKind;

/// Why `new` cannot replace `old`, or `Ok` when it can in both directions.
pub fn check_full(old: &Schema, new: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(old, new)
        .map_err(|e| format!("new schema cannot read data written with the old one: {e}"))?;
    SchemaCompatibility::can_read(new, old)
        .map_err(|e| format!("old schema cannot read data written with the new one: {e}"))?;
    Ok(())
}

/// The released version directories under `released_root`, oldest first.
pub fn released_versions(released_root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir(released_root)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix('v')?.parse().ok()?;
            Some((n, entry.path()))
        })
        .collect();
    dirs.sort();
    Ok(dirs.into_iter().map(|(_, p)| p).collect())
}

/// Checks `current(kind)` against every released copy of each kind. A kind missing from a
/// release is new in a later one and is skipped for that release. Returns every violation.
pub fn check_against_released(
    released_root: &Path,
    current: impl Fn(EventKind) -> Result<Schema, String>,
) -> Result<usize, Vec<String>> {
    let mut problems = Vec::new();
    let mut checked = 0;
    let versions = released_versions(released_root).map_err(|e| vec![format!("{}: {e}", released_root.display())])?;
    if versions.is_empty() {
        return Err(vec![format!("no released schema versions under {}", released_root.display())]);
    }
    for kind in EventKind::ALL {
        let new = match current(kind) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{}: current schema: {e}", kind.name()));
                continue;
            }
        };
        for dir in &versions {
            let path = dir.join(format!("{}.avsc", kind.name()));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            checked += 1;
            match Schema::parse_str(&text) {
                Ok(old) => {
                    if let Err(e) = check_full(&old, &new) {
                        problems.push(format!("{} vs {}: {e}", kind.name(), path.display()));
                    }
                }
                Err(e) => problems.push(format!("{}: released copy does not parse: {e}", path.display())),
            }
        }
    }
    if problems.is_empty() { Ok(checked) } else { Err(problems) }
}
