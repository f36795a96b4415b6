//! Folds criterion's estimates and the load generator's rows into the one table `make bench`
//! prints.
//!
//! Usage: `bench_report CRITERION_DIR [ROWS.json ...]`. For criterion, each group's
//! `callisto_*` functions are reported against the group's `baseline_*` function: the value is
//! Callisto's mean time per iteration, the ratio Callisto ÷ baseline (lower is better).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use callisto_benches::stats::{Row, print_table};
use serde_json::Value;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let criterion_dir = PathBuf::from(args.next().context("usage: bench_report CRITERION_DIR [ROWS.json ...]")?);
    let mut rows = criterion_rows(&criterion_dir)?;
    for path in args {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let more: Vec<Row> = serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
        rows.extend(more);
    }
    print_table(&rows);
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    let missed = rows.iter().filter(|r| r.met == Some(false)).count();
    println!("\ntargets: {met} met, {missed} not met");
    Ok(())
}

/// (group, function) → mean nanoseconds per iteration, from every `new/` result under `dir`.
fn estimates(dir: &Path, out: &mut BTreeMap<(String, String), f64>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let (benchmark, estimate) = (path.join("new/benchmark.json"), path.join("new/estimates.json"));
        if benchmark.is_file() && estimate.is_file() {
            let benchmark: Value = serde_json::from_str(&std::fs::read_to_string(&benchmark)?)?;
            let estimate: Value = serde_json::from_str(&std::fs::read_to_string(&estimate)?)?;
            let group = benchmark["group_id"].as_str().unwrap_or_default().to_owned();
            let function = benchmark["function_id"].as_str().unwrap_or_default().to_owned();
            if let Some(mean) = estimate["mean"]["point_estimate"].as_f64() {
                out.insert((group, function), mean);
            }
        } else {
            estimates(&path, out)?;
        }
    }
    Ok(())
}

fn criterion_rows(dir: &Path) -> anyhow::Result<Vec<Row>> {
    let mut found = BTreeMap::new();
    if dir.is_dir() {
        estimates(dir, &mut found)?;
    }
    let mut rows = Vec::new();
    let groups: std::collections::BTreeSet<&String> = found.keys().map(|(g, _)| g).collect();
    for group in groups {
        let baseline =
            found.iter().find(|((g, f), _)| g == group && f.starts_with("baseline")).map(|((_, f), v)| (f, *v));
        for ((g, function), nanos) in &found {
            if g != group || !function.starts_with("callisto") {
                continue;
            }
            let (value, unit, scale) = scaled(*nanos);
            let mut row = Row::new(format!("{group}/{function} (time per iteration)"), value, unit);
            if let Some((name, base)) = baseline {
                row = row.against(name.clone(), base / scale);
            }
            if group.starts_with("search_1000000_notes") {
                row = row.at_most(20.0 * 1_000_000.0 / scale);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// A readable unit for a time in nanoseconds: (value, unit, nanoseconds per unit).
fn scaled(nanos: f64) -> (f64, &'static str, f64) {
    if nanos >= 1e6 {
        (nanos / 1e6, "ms", 1e6)
    } else if nanos >= 1e3 {
        (nanos / 1e3, "µs", 1e3)
    } else {
        (nanos, "ns", 1.0)
    }
}
