//! The shipped alert rules (`deploy/prometheus/alerts.yml`): they query only metrics Callisto
//! exports, `promtool check rules` accepts them, and their unit tests (`alerts_test.yml`: which
//! alerts fire and which stay quiet) pass. `.ci/run` installs promtool (Debian `prometheus`).

use std::path::{Path, PathBuf};
use std::process::Command;

use callisto_core::telemetry::METRICS;

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[test]
fn alerts_query_only_exported_metrics() {
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let mut queried: Vec<String> = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| word.starts_with("callisto_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"].iter().find_map(|suffix| word.strip_suffix(suffix)).unwrap_or(word).to_owned()
        })
        .collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 5, "{queried:?}");
    for name in &queried {
        assert!(METRICS.iter().any(|(exported, _, _)| exported == name), "{name} is not a Callisto metric");
    }
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CALLISTO_REQUIRE_PEERS").is_none(),
            "promtool is required here: apt-get install prometheus"
        );
        eprintln!("skipped: install promtool (Debian package prometheus) to run");
        return;
    }
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]] {
        let output = Command::new("promtool").args(args).current_dir(rules_dir()).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
