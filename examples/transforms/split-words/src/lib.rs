//! Splits each line into words and emits one record per word, keyed by the word, so that
//! a downstream count per key lands on one partition.

use runnel_sdk::{Config, Output, Record, Transform};

struct SplitWords;

impl Transform for SplitWords {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(SplitWords)
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let line = record.value_str().ok_or("the value is not UTF-8 text")?;
        for word in line.split_whitespace() {
            let word = word.to_lowercase();
            out.emit(Some(word.as_bytes()), Some(word.as_bytes()));
        }
        Ok(())
    }
}

runnel_sdk::export_transform!(SplitWords);
