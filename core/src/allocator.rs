//! The allocator's settings, in place before a process does any work.
//!
//! Callisto's binaries allocate with jemalloc (through `tikv-jemallocator`, as TiKV and other
//! Rust databases do). A rebuild allocates and frees a batch's worth of memory many times a
//! second, freeing much of it on another thread than the one that allocated it (a batch is
//! decoded on one thread and written on the store's own). jemalloc's defaults keep freed memory
//! for ten seconds in up to four arenas per core; the settings below keep it about a second, in
//! one arena per core, and hand it back from a background thread, off the threads that do the
//! work. Against mimalloc returning freed memory at once, a 1M-event rebuild took about a third
//! less system CPU at the same peak RSS (`BENCHMARKS.md`, tenth pass).
//!
//! jemalloc reads its options from `_RJEM_MALLOC_CONF` when the process starts, and setting
//! them at run time would need `unsafe` code, which this workspace forbids. A process started
//! without Callisto's options therefore replaces itself once, in place (`exec`: the same pid,
//! arguments and environment), with them put in front of whatever the variable held. jemalloc
//! applies options left to right, so an option the operator set (say `dirty_decay_ms:10000`)
//! overrides Callisto's.

use std::ffi::{OsStr, OsString};

/// The environment variable `tikv-jemallocator`'s jemalloc reads its options from.
pub const CONF_VARIABLE: &str = "_RJEM_MALLOC_CONF";

/// Callisto's options, around the number of arenas.
const BEFORE_ARENAS: &str = "background_thread:true,narenas:";
const AFTER_ARENAS: &str = ",dirty_decay_ms:1000,muzzy_decay_ms:0";

/// Callisto's jemalloc options on a machine with `cores` cores.
pub fn settings(cores: usize) -> String {
    format!("{BEFORE_ARENAS}{}{AFTER_ARENAS}", cores.max(1))
}

/// What the operator set: `current` without Callisto's options in front of it, whatever core
/// count those were for. A process inherits them from the Callisto process that started it,
/// which may have had more cores than it has (a rebuild pinned to one core, say).
fn operators(current: &str) -> &str {
    let Some(rest) = current.strip_prefix(BEFORE_ARENAS) else { return current };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    match rest.strip_prefix(AFTER_ARENAS) {
        Some("") => "",
        Some(after) => after.strip_prefix(',').unwrap_or(current),
        None => current,
    }
}

/// The value the variable needs when it holds `current`: Callisto's `settings`, then the
/// operator's options. `None` when it holds that already.
fn wanted(settings: &str, current: Option<&OsStr>) -> Option<OsString> {
    let current = current.map(|value| value.to_string_lossy().into_owned()).unwrap_or_default();
    let value = match operators(&current) {
        "" => settings.to_owned(),
        operators => format!("{settings},{operators}"),
    };
    (value != current).then(|| value.into())
}

/// Replaces the process with itself with Callisto's options in front of the operator's. Returns
/// `Ok` when they are in place already, and the error when the replacement could not start (the
/// process then goes on with jemalloc's defaults).
pub fn apply_settings() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let Some(value) = wanted(&settings(cores), std::env::var_os(CONF_VARIABLE).as_deref()) else {
        return Ok(());
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    Err(std::process::Command::new(std::env::current_exe()?).arg0(arg0).args(args).env(CONF_VARIABLE, value).exec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callisto_options_go_in_front_of_the_operators_once() {
        let ours = settings(2);
        assert!(ours.contains("narenas:2"), "{ours}");
        assert_eq!(wanted(&ours, None), Some(OsString::from(&ours)));
        assert_eq!(wanted(&ours, Some(OsStr::new(""))), Some(OsString::from(&ours)));
        let operator = wanted(&ours, Some(OsStr::new("dirty_decay_ms:10000"))).unwrap();
        assert_eq!(operator, OsString::from(format!("{ours},dirty_decay_ms:10000")));
        // After the replacement the options are in place, and it does not happen again.
        assert_eq!(wanted(&ours, Some(&operator)), None);
        assert_eq!(wanted(&ours, Some(OsStr::new(&ours))), None);
        assert!(settings(0).contains("narenas:1"), "at least one arena");
        // Options inherited from a process with more cores give way, and the operator's stay.
        let inherited = format!("{},dirty_decay_ms:10000", settings(16));
        assert_eq!(wanted(&ours, Some(OsStr::new(&inherited))), Some(operator.clone()));
        assert_eq!(wanted(&ours, Some(OsStr::new(&settings(16)))), Some(OsString::from(&ours)));
        // Options that only look like Callisto's are the operator's.
        let lookalike = format!("{}5", settings(2));
        assert_eq!(wanted(&ours, Some(OsStr::new(&lookalike))), Some(OsString::from(format!("{ours},{lookalike}"))));
    }
}
