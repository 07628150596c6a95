//! A sink that misbehaves on purpose, to show how the connect runtime handles bad
//! connectors. By record value: `trap` panics, `loop` never returns (stopped by the call
//! timeout), `refuse` is rejected (the error policy handles it); anything else is logged
//! and accepted.

use runnel_sdk::connect::{Failure, Sink, WriteError, log};
use runnel_sdk::{Config, Record};

struct Faulty;

impl Sink for Faulty {
    fn open(_config: &Config) -> Result<Self, Failure> {
        Ok(Faulty)
    }

    fn write(&mut self, _topic: &str, records: &[Record<'_>]) -> Result<(), WriteError> {
        let mut refused = Vec::new();
        for (i, record) in records.iter().enumerate() {
            match record.value_str() {
                Some("trap") => panic!("asked to trap at offset {}", record.offset()),
                Some("loop") => {
                    let mut n = 0u64;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                Some("refuse") => refused.push((i as u32, "refused on request".to_string())),
                other => log::info(&format!("accepted {:?}", other.unwrap_or("<binary>"))),
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(WriteError::Rejected(refused))
        }
    }
}

runnel_sdk::export_sink!(Faulty);
