//! Drops repeated ids within a window of event time: a record whose id (its key, or the
//! header named by config `id-header`) was seen less than `window-ms` (default 10
//! minutes) before is dropped; the first is forwarded unchanged. Each id is forgotten
//! by an event-time timer once its window has passed, so the store holds only the ids of
//! the last window.
//!
//! Deploy: `runnel transform deploy --name dedup --input payments --output payments-once
//! --wasm dedup.wasm --store seen --processing exactly-once`.

use runnel_sdk::stateful::{Clock, Init, StatefulTransform, Store, Timer, schedule};
use runnel_sdk::{Output, Record};

struct Dedup {
    window_ms: i64,
    id_header: Option<String>,
    /// id → timestamp of its first record.
    seen: Store<Vec<u8>, i64>,
}

impl StatefulTransform for Dedup {
    fn init(init: &Init) -> Result<Self, String> {
        let window_ms = match init.config().get("window-ms") {
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| format!("window-ms must be a positive number, not {text:?}"))?,
            None => 600_000,
        };
        Ok(Dedup {
            window_ms,
            id_header: init.config().get("id-header").map(str::to_string),
            seen: init.store("seen")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let id = match &self.id_header {
            Some(name) => record.header(name),
            None => record.key(),
        }
        .ok_or("the record carries no id")?
        .to_vec();
        if let Some(first) = self.seen.get(&id)?
            && record.timestamp_ms() - first < self.window_ms
        {
            return Ok(());
        }
        let expires = record.timestamp_ms().saturating_add(self.window_ms);
        self.seen.put(&id, &record.timestamp_ms())?;
        schedule(Clock::EventTime, expires, &id);
        out.forward(record);
        Ok(())
    }

    fn on_timer(&mut self, timer: &Timer, _out: &mut Output) -> Result<(), String> {
        // A later first sighting (after the window) set its own, later timer: keep it.
        if let Some(first) = self.seen.get(&timer.key)?
            && first.saturating_add(self.window_ms) <= timer.at_ms
        {
            self.seen.delete(&timer.key)?;
        }
        Ok(())
    }
}

runnel_sdk::export_stateful_transform!(Dedup);
