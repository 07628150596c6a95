//! Counts records per key in tumbling windows of event time (one minute unless config
//! `window-ms` says otherwise), and emits each window's count once, when the window
//! closes: key = the record key, value = `START-END COUNT` (milliseconds since the
//! epoch), timestamp = the window's last millisecond.
//!
//! With config `emit=updates`, each record's window count is emitted at once instead
//! (the count so far, timestamp = the record's), and nothing more when the window
//! closes.
//!
//! A window closes when the partition's watermark (largest timestamp seen minus the
//! deployment's `--allowed-lateness-ms`) reaches its end; records of a window still
//! open are counted even if they come late. Records of a closed window are dropped and
//! counted in store `late` (key = the record key), readable with `runnel transform state
//! NAME --store late`.
//!
//! Deploy: `runnel transform deploy --name per-minute --input clicks --output
//! clicks-per-minute --wasm tumbling_count.wasm --store windows --store late
//! --allowed-lateness-ms 10000 --processing exactly-once`.

use runnel_sdk::stateful::windows::{self, EmitWhen, Tumbling};
use runnel_sdk::stateful::{Clock, Init, StatefulTransform, Store, Timer, schedule};
use runnel_sdk::{Emit, Output, Record};

struct TumblingCount {
    window: Tumbling,
    emit: EmitWhen,
    /// (window start, key) → count, for open windows.
    counts: Store<(i64, String), u64>,
    /// key → records dropped because their window had closed.
    late: Store<String, u64>,
}

impl StatefulTransform for TumblingCount {
    fn init(init: &Init) -> Result<Self, String> {
        let size_ms = match init.config().get("window-ms") {
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| format!("window-ms must be a positive number, not {text:?}"))?,
            None => 60_000,
        };
        let emit = match init.config().get("emit") {
            Some(text) => EmitWhen::parse(text)?,
            None => EmitWhen::Closed,
        };
        Ok(TumblingCount {
            window: Tumbling { size_ms },
            emit,
            counts: init.store("windows")?,
            late: init.store("late")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let key = record.key_str().unwrap_or("").to_string();
        let (start, end) = self.window.window_of(record.timestamp_ms());
        if windows::closed(end) {
            let dropped = self.late.get(&key)?.unwrap_or(0) + 1;
            return self.late.put(&key, &dropped);
        }
        let count = self.counts.get(&(start, key.clone()))?.unwrap_or(0) + 1;
        if count == 1 {
            // One timer per window: it emits (or forgets) every key's count at once.
            schedule(Clock::EventTime, end, &start.to_be_bytes());
        }
        if self.emit == EmitWhen::Updated {
            emit_count(out, &key, (start, end), count, record.timestamp_ms())?;
        }
        self.counts.put(&(start, key), &count)
    }

    fn on_timer(&mut self, timer: &Timer, out: &mut Output) -> Result<(), String> {
        let start = i64::from_be_bytes(
            timer
                .key
                .as_slice()
                .try_into()
                .map_err(|_| "a timer without a window start")?,
        );
        let end = start.saturating_add(self.window.size_ms);
        loop {
            let page = self.counts.prefix(&start, 1_000)?;
            if page.is_empty() {
                return Ok(());
            }
            for ((_, key), count) in page {
                if self.emit == EmitWhen::Closed {
                    emit_count(out, &key, (start, end), count, end - 1)?;
                }
                self.counts.delete(&(start, key))?;
            }
        }
    }
}

/// Emits `START-END COUNT` for `key`'s window.
fn emit_count(
    out: &mut Output,
    key: &str,
    (start, end): (i64, i64),
    count: u64,
    timestamp_ms: i64,
) -> Result<(), String> {
    let value = format!("{start}-{end} {count}");
    out.emit_record(
        None,
        &Emit {
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            timestamp_ms: Some(timestamp_ms),
            ..Emit::default()
        },
    )
}

runnel_sdk::export_stateful_transform!(TumblingCount);
