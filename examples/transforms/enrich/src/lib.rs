//! Adds fields to JSON objects: every config entry `set.NAME=VALUE` becomes a string field,
//! and `source_offset` records where the input came from.

use runnel_sdk::{Config, Output, Record, Transform};

struct Enrich {
    fields: Vec<(String, String)>,
}

impl Transform for Enrich {
    fn init(config: &Config) -> Result<Self, String> {
        let fields = ["set.region", "set.team", "set.stage"]
            .iter()
            .filter_map(|k| {
                config
                    .get(k)
                    .map(|v| (k.trim_start_matches("set.").to_string(), v.to_string()))
            })
            .collect();
        Ok(Enrich { fields })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let value = record.value().ok_or("tombstone: nothing to enrich")?;
        let mut json: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
        let object = json.as_object_mut().ok_or("not a JSON object")?;
        for (name, value) in &self.fields {
            object.insert(name.clone(), serde_json::Value::String(value.clone()));
        }
        object.insert("source_offset".into(), record.offset().into());
        let bytes = serde_json::to_vec(&json).map_err(|e| e.to_string())?;
        out.emit(record.key(), Some(&bytes));
        Ok(())
    }
}

runnel_sdk::export_transform!(Enrich);
