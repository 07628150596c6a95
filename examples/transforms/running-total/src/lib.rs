//! A running total per key: each input record's value is a whole number (text, for
//! example an amount in cents) added to its key's total in store `totals`; the new total
//! is emitted (key = the input's key, value = the total as text). A value that is not a
//! number is refused (the error policy decides) and leaves the total unchanged.
//!
//! Deploy: `runnel transform deploy --name totals --input payments --output totals
//! --wasm running_total.wasm --store totals --processing exactly-once`.

use runnel_sdk::stateful::{Init, StatefulTransform, Store};
use runnel_sdk::{Output, Record};

struct RunningTotal {
    totals: Store<String, i64>,
}

impl StatefulTransform for RunningTotal {
    fn init(init: &Init) -> Result<Self, String> {
        Ok(RunningTotal {
            totals: init.store("totals")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let key = record
            .key_str()
            .ok_or("the record has no UTF-8 key")?
            .to_string();
        let text = record.value_str().ok_or("the value is not UTF-8 text")?;
        let amount: i64 = text
            .trim()
            .parse()
            .map_err(|_| format!("the value {text:?} is not a whole number"))?;
        let total = self
            .totals
            .get(&key)?
            .unwrap_or(0)
            .checked_add(amount)
            .ok_or("the total would overflow")?;
        self.totals.put(&key, &total)?;
        out.emit(Some(key.as_bytes()), Some(total.to_string().as_bytes()));
        Ok(())
    }
}

runnel_sdk::export_stateful_transform!(RunningTotal);
