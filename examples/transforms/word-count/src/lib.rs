//! Counts records per key with durable state: each input record (a word as key, as
//! `split-words` emits them) adds one to its key's count in store `counts`, and the new
//! count is emitted (key = the word, value = the count as text).
//!
//! Pipeline: lines → split-words → words (keyed by word, so each word's records are in
//! one partition) → word-count → counts. With `--processing exactly-once`, the counts a
//! read_committed consumer sees go 1, 2, 3, ... per word, with no repeat and no gap, even
//! when brokers die.
//!
//! Deploy: `runnel transform deploy --name word-count --input words --output counts
//! --wasm word_count.wasm --store counts --processing exactly-once`.

use runnel_sdk::stateful::{Init, StatefulTransform, Store};
use runnel_sdk::{Output, Record};

struct WordCount {
    counts: Store<String, u64>,
}

impl StatefulTransform for WordCount {
    fn init(init: &Init) -> Result<Self, String> {
        Ok(WordCount {
            counts: init.store("counts")?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let word = record
            .key_str()
            .ok_or("the record has no UTF-8 key (the word to count)")?
            .to_string();
        let count = self.counts.get(&word)?.unwrap_or(0) + 1;
        self.counts.put(&word, &count)?;
        out.emit(Some(word.as_bytes()), Some(count.to_string().as_bytes()));
        Ok(())
    }
}

runnel_sdk::export_stateful_transform!(WordCount);
