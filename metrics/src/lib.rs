//! Metrics of a Runnel process in the Prometheus text exposition format (version 0.0.4).
//!
//! Hot paths keep plain atomics ([`Counter`], [`Histogram`]) where they work; nothing is
//! registered globally. At scrape time each part of the process writes what it has into
//! an [`Exposition`] (counters, gauges computed from its state, histograms), which
//! groups the samples by family and renders them. So the figures of a scrape are taken
//! at that moment, and several brokers in one process each expose only their own.
//!
//! Names follow Prometheus conventions: a `runnel_` prefix (`process_` for the process
//! itself), the unit as a suffix (`_bytes`, `_seconds`), and `_total` on counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub mod process;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// A histogram of durations with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// The sum of observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, duration: std::time::Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    lines: String,
}

/// The samples of one scrape, grouped by metric family.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter sample; `name` ends in `_total`.
    pub fn counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: u64,
    ) {
        debug_assert!(name.ends_with("_total"), "{name}");
        let lines = self.family(name, help, Kind::Counter);
        sample(lines, name, labels, None, &value.to_string());
    }

    /// A counter of a fractional amount (seconds of CPU time), without labels.
    pub fn counter_f64(&mut self, name: &'static str, help: &'static str, value: f64) {
        debug_assert!(name.ends_with("_total"), "{name}");
        let lines = self.family(name, help, Kind::Counter);
        sample(lines, name, &[], None, &number(value));
    }

    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let lines = self.family(name, help, Kind::Gauge);
        sample(lines, name, labels, None, &number(value));
    }

    /// A histogram's buckets (cumulative, with `le`), sum (seconds) and count.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        histogram: &Histogram,
    ) {
        let lines = self.family(name, help, Kind::Histogram);
        let mut cumulative = 0u64;
        let bucket_name = format!("{name}_bucket");
        for (i, count) in histogram.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| number(*b));
            sample(
                lines,
                &bucket_name,
                labels,
                Some(&le),
                &cumulative.to_string(),
            );
        }
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        sample(lines, &format!("{name}_sum"), labels, None, &number(sum));
        sample(
            lines,
            &format!("{name}_count"),
            labels,
            None,
            &cumulative.to_string(),
        );
    }

    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut String {
        let family = self.families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            lines: String::new(),
        });
        debug_assert_eq!(family.kind, kind, "{name} written as two kinds");
        &mut family.lines
    }

    /// The text exposition format: each family's HELP and TYPE, then its samples.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.name());
            out.push_str(&family.lines);
        }
        out
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], le: Option<&str>, value: &str) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(key);
            out.push_str("=\"");
            escape_label(out, value);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn families_render_once_with_their_samples() {
        let mut out = Exposition::new();
        out.counter(
            "runnel_records_total",
            "Records.",
            &[("topic", "a\"b\\c\nd")],
            3,
        );
        out.gauge("runnel_up", "Up.", &[], 1.0);
        out.counter("runnel_records_total", "Records.", &[("topic", "x")], 4);
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(20));
        out.histogram(
            "runnel_latency_seconds",
            "Latency.",
            &[("rpc", "Produce")],
            &h,
        );
        let text = out.render();
        assert_eq!(
            text.matches("# TYPE runnel_records_total counter").count(),
            1
        );
        assert!(
            text.contains("runnel_records_total{topic=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_records_total{topic=\"x\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("runnel_up 1\n"), "{text}");
        assert!(
            text.contains("runnel_latency_seconds_bucket{rpc=\"Produce\",le=\"0.00025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_latency_seconds_bucket{rpc=\"Produce\",le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_latency_seconds_bucket{rpc=\"Produce\",le=\"10\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_latency_seconds_bucket{rpc=\"Produce\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_latency_seconds_count{rpc=\"Produce\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("runnel_latency_seconds_sum{rpc=\"Produce\"} 20.0003\n"),
            "{text}"
        );
        assert_eq!(h.count(), 2);
    }
}
