//! Routes JSON records by a field: records whose `field` (default `level`) equals `value`
//! (default `error`) go to the first output topic, all others to the second.

use runnel_sdk::{Config, Output, Record, Transform};

struct Router {
    field: String,
    value: String,
    matched: String,
    other: String,
}

impl Transform for Router {
    fn init(config: &Config) -> Result<Self, String> {
        let [matched, other] = config.outputs() else {
            return Err(format!(
                "the router needs exactly two output topics (matched, other), got {:?}",
                config.outputs()
            ));
        };
        Ok(Router {
            field: config.get("field").unwrap_or("level").to_string(),
            value: config.get("value").unwrap_or("error").to_string(),
            matched: matched.clone(),
            other: other.clone(),
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let value = record.value().ok_or("tombstone: nothing to route")?;
        let json: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
        let hit =
            json.get(&self.field).and_then(serde_json::Value::as_str) == Some(self.value.as_str());
        out.forward_to(if hit { &self.matched } else { &self.other }, record)
    }
}

runnel_sdk::export_transform!(Router);
