//! The allocator's settings, in place before a process does any work.
//!
//! Callisto's binaries allocate with mimalloc. By default it commits each arena it reserves in
//! one go and keeps freed memory for a second before handing it back, so the churn of a rebuild
//! (tantivy building segments, redb's page buffers, decoded batches) stays resident long after
//! it is freed: a 200k-event rebuild peaked at about 400 MiB with the defaults and about
//! 250 MiB with the settings below, at the same rate within run-to-run noise (`BENCHMARKS.md`).
//!
//! mimalloc reads these options from the environment when the process starts, and setting them
//! through its C API would need `unsafe` code, which this workspace forbids. A process started
//! without them therefore replaces itself once, in place (`exec`: the same pid, arguments and
//! environment), with them added. An option already in the environment is left as the operator
//! set it, so `MIMALLOC_PURGE_DELAY=1000` restores mimalloc's own default.

use std::ffi::OsString;

/// mimalloc options and the values Callisto runs with.
pub const SETTINGS: [(&str, &str); 2] = [
    // Commit arena memory as it is used, not a whole arena at once.
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
    // Hand freed pages back to the OS at once instead of after a second.
    ("MIMALLOC_PURGE_DELAY", "0"),
];

/// The settings `environment` lacks.
fn missing(environment: impl Fn(&str) -> Option<OsString>) -> Vec<(&'static str, &'static str)> {
    SETTINGS.into_iter().filter(|(name, _)| environment(name).is_none()).collect()
}

/// Replaces the process with itself plus any missing [`SETTINGS`]. Returns `Ok` when none is
/// missing, and the error when the replacement could not start (the process then goes on with
/// mimalloc's defaults).
pub fn apply_settings() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let missing = missing(|name| std::env::var_os(name));
    if missing.is_empty() {
        return Ok(());
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    Err(std::process::Command::new(std::env::current_exe()?).arg0(arg0).args(args).envs(missing).exec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_the_environment_lacks_are_added() {
        let none = missing(|_| None);
        assert_eq!(none, SETTINGS.to_vec());
        let operator_set = missing(|name| (name == "MIMALLOC_PURGE_DELAY").then(|| OsString::from("1000")));
        assert_eq!(operator_set, vec![("MIMALLOC_ARENA_EAGER_COMMIT", "0")]);
        assert!(missing(|_| Some(OsString::from("0"))).is_empty());
    }
}
