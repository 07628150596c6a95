//! Keeps JSON records whose numeric field is at least a minimum, drops the rest.
//!
//! Config: `field` (default `amount`), `min` (required). A record that is not a JSON
//! object, or whose top-level object lacks the field as a number, is refused: the
//! deployment's error policy decides what happens to it.
//!
//! Filters run on every record, so this one does not build a JSON tree: one pass over the
//! bytes tracks strings and nesting, and only the wanted top-level field's number is
//! parsed. No allocation per record.

use runnel_sdk::{Config, Output, Record, Transform};

struct Filter {
    /// The key as it appears in JSON, quotes included: `"amount"`.
    quoted_field: Vec<u8>,
    field: String,
    min: f64,
}

/// The number stored under the top-level key `quoted` of the JSON object in `json`.
fn top_level_number(json: &[u8], quoted: &[u8]) -> Result<Option<f64>, &'static str> {
    let start = json
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or("empty value")?;
    if json[start] != b'{' {
        return Err("not a JSON object");
    }
    let mut depth = 0usize;
    let mut i = start;
    // Whether the string that starts at i is in key position (after `{` or `,` at depth 1).
    let mut expect_key = false;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let string_start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if i >= json.len() {
                    return Err("unterminated string");
                }
                let is_key = depth == 1 && expect_key;
                expect_key = false;
                if is_key && &json[string_start..=i] == quoted {
                    let mut j = i + 1;
                    while j < json.len() && json[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if json.get(j) != Some(&b':') {
                        return Err("a key without a value");
                    }
                    j += 1;
                    while j < json.len() && json[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    let end = json[j..]
                        .iter()
                        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                        .map_or(json.len(), |n| j + n);
                    return Ok(parse_number(&json[j..end]));
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key = json[i] == b'{' && depth == 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
        i += 1;
    }
    Ok(None)
}

/// Integers, the common case, without the general float parser.
fn parse_number(text: &[u8]) -> Option<f64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if !digits.is_empty() && digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) {
        let n = digits
            .iter()
            .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        return Some(if negative { -n } else { n } as f64);
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

impl Transform for Filter {
    fn init(config: &Config) -> Result<Self, String> {
        let min = config.require("min")?;
        let field = config.get("field").unwrap_or("amount").to_string();
        Ok(Filter {
            quoted_field: format!("\"{field}\"").into_bytes(),
            field,
            min: min
                .parse()
                .map_err(|_| format!("min must be a number, got {min:?}"))?,
        })
    }

    fn process(&mut self, record: &Record<'_>, out: &mut Output) -> Result<(), String> {
        let value = record.value().ok_or("tombstone: no JSON to filter")?;
        let number = top_level_number(value, &self.quoted_field)
            .map_err(|reason| format!("not JSON: {reason}"))?
            .ok_or_else(|| format!("field {:?} is missing or not a number", self.field))?;
        if number >= self.min {
            out.forward(record);
        }
        Ok(())
    }
}

runnel_sdk::export_transform!(Filter);

#[cfg(test)]
mod tests {
    use super::top_level_number;

    #[test]
    fn finds_only_top_level_numbers() {
        let q = b"\"amount\"";
        assert_eq!(
            top_level_number(br#"{"id":1,"amount":150}"#, q),
            Ok(Some(150.0))
        );
        assert_eq!(
            top_level_number(br#" { "amount" : -2.5e1 }"#, q),
            Ok(Some(-25.0))
        );
        assert_eq!(
            top_level_number(br#"{"x":{"amount":5},"y":"\"amount\":7"}"#, q),
            Ok(None)
        );
        assert_eq!(top_level_number(br#"{"amount":"high"}"#, q), Ok(None));
        assert!(top_level_number(b"[1,2]", q).is_err());
        assert!(top_level_number(b"plain text", q).is_err());
    }
}
