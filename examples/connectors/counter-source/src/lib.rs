//! A source that counts: it produces `0`, `1`, `2`, ... up to `count` (config, default
//! unbounded), keyed by the number modulo `keys` (default 4). Its position is the next
//! number, so a restarted connector continues where the committed position says.

use runnel_sdk::Config;
use runnel_sdk::connect::{Batch, Failure, Source};

struct Counter {
    next: u64,
    count: Option<u64>,
    keys: u64,
}

fn number(config: &Config, key: &str) -> Result<Option<u64>, Failure> {
    config
        .get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| Failure::Fatal(format!("config {key}: {v:?} is not a number")))
        })
        .transpose()
}

impl Source for Counter {
    fn open(config: &Config, position: Option<&[u8]>) -> Result<Self, Failure> {
        let next = match position {
            Some(p) => std::str::from_utf8(p)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| Failure::Fatal("the committed position is not a number".into()))?,
            None => 0,
        };
        let keys = number(config, "keys")?.unwrap_or(4).max(1);
        Ok(Counter {
            next,
            count: number(config, "count")?,
            keys,
        })
    }

    fn poll(&mut self, batch: &mut Batch) -> Result<(), Failure> {
        while !batch.is_full() && self.count.is_none_or(|count| self.next < count) {
            let key = (self.next % self.keys).to_string();
            batch.emit(Some(key.as_bytes()), Some(self.next.to_string().as_bytes()));
            self.next += 1;
        }
        batch.set_position(self.next.to_string());
        if batch.is_empty() {
            // Done counting: look again in a second (the count never grows, though).
            batch.idle(1000);
        }
        Ok(())
    }
}

runnel_sdk::export_source!(Counter);
