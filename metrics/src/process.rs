//! The process's own metrics, with the names Prometheus client libraries use
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read from
//! Linux's `/proc`. Elsewhere nothing is written.

use crate::Exposition;

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on Linux's platforms).
const TICKS_PER_SECOND: f64 = 100.0;

/// Writes CPU time, memory, open file descriptors, threads and start time.
pub fn collect(out: &mut Exposition) {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name;
        // starttime is field 22.
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(11), field(12)) {
            out.counter_f64(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                (user + system) / TICKS_PER_SECOND,
            );
        }
        if let (Some(start), Some(boot)) = (field(19), boot_time()) {
            out.gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &[],
                boot + start / TICKS_PER_SECOND,
            );
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        };
        if let Some(rss) = kib("VmRSS:") {
            out.gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                &[],
                rss * 1024.0,
            );
        }
        if let Some(size) = kib("VmSize:") {
            out.gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                &[],
                size * 1024.0,
            );
        }
        if let Some(threads) = kib("Threads:") {
            out.gauge("process_threads", "Number of OS threads.", &[], threads);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            &[],
            entries.count() as f64,
        );
    }
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reports_its_cpu_memory_and_files() {
        let mut out = Exposition::new();
        collect(&mut out);
        let text = out.render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("\n{name} ")),
                "{name} missing: {text}"
            );
        }
    }
}
