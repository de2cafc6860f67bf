//! JSON payloads kept as text: checked once on the way in, then shared and
//! written out verbatim, never parsed into a tree or copied (a reassembled
//! message may be 64 MiB).
//!
//! Checking a value as raw text does not recurse into it, so serde_json's own
//! nesting limit does not apply: [`check_depth`] bounds the nesting instead,
//! for the agents' parsers that do recurse.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use memchr::memchr2;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// Why bytes are not taken as a JSON payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Arrays and objects nest deeper than the limit.
    #[error(
        "nested more than {limit} levels deep in arrays and objects (the limit is protocol.max_json_depth)"
    )]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The bytes are not one UTF-8 JSON value.
    #[error("not JSON: {0}")]
    Invalid(String),
}

/// Checks that arrays and objects in `bytes` nest at most `max_depth` levels
/// deep (a scalar is at depth 0, `[]` at 1, `[{}]` at 2), in one pass over the
/// bytes and without recursion; brackets inside strings do not count. It stops
/// at the first bracket over the limit. On bytes that are not JSON its answer
/// means nothing more than "no more than `max_depth` brackets open at once":
/// validate them as well ([`RawJson::parse`] does both).
pub fn check_depth(bytes: &[u8], max_depth: usize) -> Result<(), JsonError> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match b {
            b'"' => {
                // Skip the string to its closing quote; a backslash escapes
                // the byte after it (`\"` and `\\` among others).
                loop {
                    let rest = bytes.get(i..).unwrap_or_default();
                    match memchr2(b'"', b'\\', rest) {
                        Some(at) if rest.get(at) == Some(&b'\\') => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                        // An unterminated string: nothing after it counts.
                        None => return Ok(()),
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(JsonError::TooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

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
    /// nested at most `max_depth` deep ([`check_depth`], first: it is the
    /// cheaper check and stops early) and keeps them.
    pub fn parse(bytes: Vec<u8>, max_depth: usize) -> Result<Self, JsonError> {
        check_depth(&bytes, max_depth)?;
        let text =
            String::from_utf8(bytes).map_err(|e| JsonError::Invalid(format!("not UTF-8: {e}")))?;
        RawValue::from_string(text)
            .map(|raw| Self(Arc::new(Held { raw, gauge: None })))
            .map_err(|e| JsonError::Invalid(e.to_string()))
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

    /// `null`.
    pub fn null() -> Self {
        Self(Arc::new(Held {
            raw: RawValue::NULL.to_owned(),
            gauge: None,
        }))
    }

    /// The JSON text as [`Bytes`] that share it (no copy).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from_owner(self.clone())
    }

    /// Parsed into a [`serde_json::Value`] (a copy, for small payloads).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

impl AsRef<[u8]> for RawJson {
    fn as_ref(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RawJson {}

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
    use proptest::prelude::*;
    use serde_json::Value;

    /// `depth` arrays around a scalar.
    fn nested(depth: usize) -> Vec<u8> {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
    }

    #[test]
    fn nesting_exactly_at_the_limit_passes_and_one_deeper_fails() {
        for limit in [0, 1, 2, 64] {
            assert_eq!(check_depth(&nested(limit), limit), Ok(()));
            assert_eq!(
                check_depth(&nested(limit + 1), limit),
                Err(JsonError::TooDeep { limit })
            );
        }
        assert_eq!(check_depth(b"1", 0), Ok(()));
        assert_eq!(check_depth(br#"{"a":[{"b":{}}]}"#, 4), Ok(()));
        assert!(check_depth(br#"{"a":[{"b":{}}]}"#, 3).is_err());
        // Siblings do not add up: depth is how many are open at once.
        assert_eq!(check_depth(b"[[],[],{},[{}]]", 3), Ok(()));
        let err = RawJson::parse(nested(65), 64).expect_err("too deep");
        assert!(err.to_string().contains("protocol.max_json_depth"), "{err}");
        assert!(err.to_string().contains("64"), "{err}");
        RawJson::parse(nested(64), 64).expect("at the limit");
    }

    #[test]
    fn brackets_in_strings_and_escaped_quotes_do_not_count() {
        assert_eq!(check_depth(br#"["[[[{{{"]"#, 1), Ok(()));
        assert_eq!(check_depth(br#"{"{[": "]}[{"}"#, 1), Ok(()));
        // An escaped quote does not end the string; an escaped backslash does
        // not escape the quote after it.
        assert_eq!(check_depth(br#"["a\"[[[", "b"]"#, 1), Ok(()));
        assert_eq!(check_depth(br#"["a\\", [[1]]]"#, 3), Ok(()));
        assert!(check_depth(br#"["a\\", [[1]]]"#, 2).is_err());
        assert_eq!(check_depth(br#"["\\\"[", "\u005b"]"#, 1), Ok(()));
        // Unterminated strings and stray closers are not JSON; no panic.
        assert_eq!(check_depth(br#"["abc\"#, 1), Ok(()));
        assert_eq!(check_depth(br#"["abc\\"#, 1), Ok(()));
        assert_eq!(check_depth(b"]]]][", 1), Ok(()));
    }

    #[test]
    fn a_payload_100_000_levels_deep_is_refused_quickly_without_recursion() {
        let deep = nested(100_000);
        let mut deep_object = b"{\"a\":".repeat(100_000);
        deep_object.extend_from_slice(b"1");
        deep_object.extend_from_slice(&b"}".repeat(100_000));
        // A small stack: any recursion over the levels would overflow it.
        let checked = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let started = std::time::Instant::now();
                let results = [
                    check_depth(&deep, 64),
                    RawJson::parse(deep.clone(), 64).map(drop),
                    RawJson::parse(deep_object, 64).map(drop),
                ];
                let took = started.elapsed();
                // The whole pass, at a limit it meets, does not recurse either.
                assert_eq!(check_depth(&deep, 100_000), Ok(()));
                (results, took)
            })
            .expect("thread")
            .join()
            .expect("no stack overflow");
        let (results, took) = checked;
        for r in results {
            assert_eq!(r, Err(JsonError::TooDeep { limit: 64 }));
        }
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    }

    /// How deep `v`'s arrays and objects nest.
    fn depth_of(v: &Value) -> usize {
        match v {
            Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Strings full of what the check must skip: brackets, quotes, backslashes.
    fn tricky_string() -> impl Strategy<Value = String> {
        proptest::string::string_regex(r#"[\[\]{}"\\a\u{e9}\n]{0,8}"#).expect("regex")
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            tricky_string().prop_map(Value::String),
        ];
        let tree = leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((tricky_string(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        });
        // Wrapped in up to 200 more levels, to cross serde_json's own limit.
        (
            tree,
            prop::collection::vec((any::<bool>(), tricky_string()), 0..200),
        )
            .prop_map(|(mut v, layers)| {
                for (array, key) in layers {
                    v = if array {
                        Value::Array(vec![v])
                    } else {
                        Value::Object([(key, v)].into_iter().collect())
                    };
                }
                v
            })
    }

    proptest! {
        #[test]
        fn the_check_agrees_with_serde_json_on_random_values(v in any_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_vec_pretty(&v)
            } else {
                serde_json::to_vec(&v)
            }
            .expect("serialises");
            let depth = depth_of(&v);
            prop_assert_eq!(check_depth(&text, depth), Ok(()));
            if depth > 0 {
                prop_assert!(check_depth(&text, depth - 1).is_err());
            }
            // serde_json parses a tree up to 127 levels deep, and refuses deeper ones.
            let parsed = serde_json::from_slice::<Value>(&text);
            prop_assert_eq!(parsed.is_ok(), check_depth(&text, 127).is_ok(), "depth {}", depth);
        }
    }

    #[test]
    fn valid_json_is_kept_verbatim_and_written_out_as_json() {
        let raw = RawJson::parse(br#"{"n": 1, "s": "x"}"#.to_vec(), 64).expect("valid");
        assert_eq!(raw.as_str(), r#"{"n": 1, "s": "x"}"#);
        assert_eq!(raw.to_value()["n"], 1);
        let wrapped = serde_json::json!({ "payload": raw });
        assert_eq!(wrapped.to_string(), r#"{"payload":{"n":1,"s":"x"}}"#);
        let text = serde_json::to_string(&vec![raw.clone()]).expect("serialize");
        assert_eq!(text, r#"[{"n": 1, "s": "x"}]"#);
    }

    #[test]
    fn invalid_json_and_invalid_utf8_are_refused() {
        for bad in [b"{".to_vec(), b"1 2".to_vec(), vec![b'"', 0xff, b'"']] {
            let err = RawJson::parse(bad, 64).expect_err("refused");
            assert!(matches!(err, JsonError::Invalid(_)), "{err}");
        }
    }

    #[test]
    fn a_counted_value_is_counted_until_its_last_clone_is_dropped() {
        let gauge = Arc::new(AtomicU64::new(0));
        let raw = RawJson::parse(b"[1,2]".to_vec(), 64)
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
        let big = RawJson::parse(format!("\"{}\"", "a".repeat(1000)).into_bytes(), 64).expect("ok");
        let shown = format!("{big:?}");
        assert!(
            shown.len() < 300 && shown.ends_with("(1002 bytes)"),
            "{shown}"
        );
    }
}
