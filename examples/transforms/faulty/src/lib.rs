//! A transform that misbehaves on purpose, to show how deployments handle bad guests.
//! By record value: `trap` panics (a trap), `loop` never returns (stopped by the CPU
//! limit), `grow` allocates without bound (stopped by the memory limit), `bad` is refused
//! with an error value, `undeclared` emits to a topic the deployment did not declare;
//! anything else is forwarded.

use runnel_sdk::{Config, Output, Record, Transform};

struct Faulty;

impl Transform for Faulty {
    fn init(_config: &Config) -> Result<Self, String> {
        runnel_sdk::log::info("faulty transform ready");
        Ok(Faulty)
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        match record.value_str() {
            Some("trap") => panic!("asked to trap at offset {}", record.offset()),
            Some("loop") => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some("grow") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("bad") => Err(format!("record at offset {} is bad", record.offset())),
            Some("undeclared") => out.emit_to("nowhere", None, Some(b"x")),
            _ => {
                out.forward(record);
                Ok(())
            }
        }
    }
}

runnel_sdk::export_transform!(Faulty);
