//! Latency histograms and the rows every benchmark reports.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One line of the final table: a figure, its baseline from the same run, and their ratio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub figure: String,
    pub value: f64,
    pub unit: String,
    pub baseline: Option<f64>,
    pub baseline_name: Option<String>,
    /// A target from the benchmark plan, e.g. "ratio >= 0.40" or "<= 20 ms".
    pub target: Option<String>,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(figure: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            figure: figure.into(),
            value,
            unit: unit.into(),
            baseline: None,
            baseline_name: None,
            target: None,
            met: None,
        }
    }

    pub fn against(mut self, name: impl Into<String>, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        self.baseline_name = Some(name.into());
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline.filter(|b| *b > 0.0).map(|b| self.value / b)
    }

    /// Target on the ratio to the baseline: at least `min`.
    pub fn ratio_at_least(mut self, min: f64) -> Self {
        self.met = self.ratio().map(|r| r >= min);
        self.target = Some(format!("ratio >= {min:.2}"));
        self
    }

    /// Target on the value itself: at most `max` (in the row's unit).
    pub fn at_most(mut self, max: f64) -> Self {
        self.met = Some(self.value <= max);
        self.target = Some(format!("<= {max} {}", self.unit));
        self
    }

    /// Target on the value itself: at least `min` (in the row's unit).
    pub fn at_least(mut self, min: f64) -> Self {
        self.met = Some(self.value >= min);
        self.target = Some(format!(">= {min} {}", self.unit));
        self
    }
}

/// Prints rows as the one table `make bench` shows.
pub fn print_table(rows: &[Row]) {
    println!("{:<58} {:>14} {:>14} {:>8}  {:<16} target", "figure", "value", "baseline", "ratio", "baseline is");
    for row in rows {
        let value = format!("{:.2} {}", row.value, row.unit);
        let baseline = row.baseline.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into());
        let ratio = row.ratio().map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into());
        let target = match (&row.target, row.met) {
            (Some(t), Some(true)) => format!("{t}: met"),
            (Some(t), Some(false)) => format!("{t}: NOT met"),
            (Some(t), None) => t.clone(),
            _ => String::new(),
        };
        println!(
            "{:<58} {:>14} {:>14} {:>8}  {:<16} {target}",
            row.figure,
            value,
            baseline,
            ratio,
            row.baseline_name.clone().unwrap_or_default()
        );
    }
}

/// Microsecond latencies from 1 µs to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
    let _ = histogram.record(micros);
}

/// The quantile in milliseconds.
pub fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}
