//! Keeps JSON records whose numeric field is at least a minimum, drops the rest.
//!
//! Config: `field` (default `amount`), `min` (required). A record that is not JSON, or
//! lacks the field, is refused: the deployment's error policy decides what happens to it.

use runnel_sdk::{Config, Output, Record, Transform};

struct Filter {
    field: String,
    min: f64,
}

impl Transform for Filter {
    fn init(config: &Config) -> Result<Self, String> {
        let min = config.require("min")?;
        Ok(Filter {
            field: config.get("field").unwrap_or("amount").to_string(),
            min: min.parse().map_err(|_| format!("min must be a number, got {min:?}"))?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let value = record.value().ok_or("tombstone: no JSON to filter")?;
        let json: serde_json::Value = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
        let number = json
            .get(&self.field)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("field {:?} is missing or not a number", self.field))?;
        if number >= self.min {
            out.forward(record);
        }
        Ok(())
    }
}

runnel_sdk::export_transform!(Filter);
