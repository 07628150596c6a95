//! Counts records per key in tumbling windows of event time (one minute unless config
//! `window-ms` says otherwise), and emits each window's count once, when the window
//! closes: key = the record key, value = `START-END COUNT` (milliseconds since the
//! epoch), timestamp = the window's last millisecond.
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

use runnel_sdk::stateful::windows::{self, Tumbling};
use runnel_sdk::stateful::{Clock, Init, StatefulTransform, Store, Timer, schedule};
use runnel_sdk::{Emit, Output, Record};

struct TumblingCount {
    window: Tumbling,
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
        Ok(TumblingCount {
            window: Tumbling { size_ms },
            counts: init.store("windows")?,
            late: init.store("late")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, _out: &mut Output) -> Result<(), String> {
        let key = record.key_str().unwrap_or("").to_string();
        let (start, end) = self.window.window_of(record.timestamp_ms());
        if windows::closed(end) {
            let dropped = self.late.get(&key)?.unwrap_or(0) + 1;
            return self.late.put(&key, &dropped);
        }
        let slot = (start, key);
        let count = self.counts.get(&slot)?.unwrap_or(0);
        if count == 0 {
            // One timer per window: it emits every key's count at once.
            schedule(Clock::EventTime, end, &start.to_be_bytes());
        }
        self.counts.put(&slot, &(count + 1))
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
                let value = format!("{start}-{end} {count}");
                out.emit_record(
                    None,
                    &Emit {
                        key: Some(key.as_bytes()),
                        value: Some(value.as_bytes()),
                        timestamp_ms: Some(end - 1),
                        ..Emit::default()
                    },
                )?;
                self.counts.delete(&(start, key))?;
            }
        }
    }
}

runnel_sdk::export_stateful_transform!(TumblingCount);
