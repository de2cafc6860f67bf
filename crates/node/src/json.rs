//! JSON payloads kept as text: checked once on the way in, then shared and
//! written out verbatim, never parsed into a tree or copied (a reassembled
//! message may be 64 MiB).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// A valid JSON value, held as its text. Cloning shares it.
#[derive(Clone)]
pub struct RawJson(Arc<Held>);

struct Held {
    raw: Box<RawValue>,
    /// Counts this text's bytes while it lives, if set.
    gauge: Option<Arc<AtomicU64>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.fetch_sub(self.raw.get().len() as u64, Ordering::Relaxed);
        }
    }
}

impl RawJson {
    /// Checks that `bytes` are one JSON value (surrounding whitespace allowed)
    /// and keeps them.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        RawValue::from_string(text)
            .map(|raw| Self(Arc::new(Held { raw, gauge: None })))
            .map_err(|e| e.to_string())
    }

    /// Adds this text's length to `gauge` until the last clone is dropped, so
    /// that the memory held by messages not yet consumed can be bounded.
    /// Only a fresh, unshared, uncounted value is counted.
    pub fn counted_in(mut self, gauge: &Arc<AtomicU64>) -> Self {
        if let Some(held) = Arc::get_mut(&mut self.0).filter(|h| h.gauge.is_none()) {
            gauge.fetch_add(held.raw.get().len() as u64, Ordering::Relaxed);
            held.gauge = Some(gauge.clone());
        }
        self
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.raw.get()
    }

    /// Parsed into a [`serde_json::Value`] (a copy, for small payloads).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 256;
        let text = self.as_str();
        match text.char_indices().nth(SHOWN) {
            Some((cut, _)) => write!(f, "{}… ({} bytes)", &text[..cut], text.len()),
            None => f.write_str(text),
        }
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.raw.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_json_is_kept_verbatim_and_written_out_as_json() {
        let raw = RawJson::parse(br#"{"n": 1, "s": "x"}"#.to_vec()).expect("valid");
        assert_eq!(raw.as_str(), r#"{"n": 1, "s": "x"}"#);
        assert_eq!(raw.to_value()["n"], 1);
        let wrapped = serde_json::json!({ "payload": raw });
        assert_eq!(wrapped.to_string(), r#"{"payload":{"n":1,"s":"x"}}"#);
        let text = serde_json::to_string(&vec![raw.clone()]).expect("serialize");
        assert_eq!(text, r#"[{"n": 1, "s": "x"}]"#);
    }

    #[test]
    fn invalid_json_and_invalid_utf8_are_refused() {
        assert!(RawJson::parse(b"{".to_vec()).is_err());
        assert!(RawJson::parse(b"1 2".to_vec()).is_err());
        assert!(RawJson::parse(vec![b'"', 0xff, b'"']).is_err());
    }

    #[test]
    fn a_counted_value_is_counted_until_its_last_clone_is_dropped() {
        let gauge = Arc::new(AtomicU64::new(0));
        let raw = RawJson::parse(b"[1,2]".to_vec())
            .expect("valid")
            .counted_in(&gauge);
        let copy = raw.clone().counted_in(&gauge);
        assert_eq!(gauge.load(Ordering::Relaxed), 5, "counted once");
        drop(raw);
        assert_eq!(gauge.load(Ordering::Relaxed), 5);
        drop(copy);
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn debug_output_is_cut_for_large_payloads() {
        let big = RawJson::parse(format!("\"{}\"", "a".repeat(1000)).into_bytes()).expect("ok");
        let shown = format!("{big:?}");
        assert!(
            shown.len() < 300 && shown.ends_with("(1002 bytes)"),
            "{shown}"
        );
    }
}
