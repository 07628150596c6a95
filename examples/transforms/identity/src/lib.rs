//! Passes every record on unchanged. Used to measure the runtime's own cost.

use runnel_sdk::{Config, Output, Record, Transform};

struct Identity;

impl Transform for Identity {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(Identity)
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        out.forward(record);
        Ok(())
    }
}

runnel_sdk::export_transform!(Identity);
