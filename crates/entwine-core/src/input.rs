//! Reading fields out of a JSON object, with errors that name the field.
//!
//! The functions' inputs are decoded by hand rather than with `#[derive(Deserialize)]` so that
//! every rejection says which field was wrong and why (serde's messages name the expected type
//! but not the field for a mistyped value).

use serde_json::{Map, Value};

/// A bad input: which field, and what is wrong with it.
///
/// `field` is a dotted path into the JSON document (`data.iot.sensor.energy`), or `body` when the
/// document as a whole is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InputError {
    /// The field that was wrong, as a dotted path.
    pub field: String,
    /// What was wrong with it, lowercase, no trailing period.
    pub reason: String,
}

impl InputError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Parses `bytes` as a JSON object.
///
/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for non-finite floats, and
/// `1e999` overflows to infinity: neither is a number JSON can carry. Rather than answer "not
/// valid JSON" for those, the body is read once more with each such token marked, and the
/// error names the field that held it.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, InputError> {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(e) => {
            return Err(non_finite_field(bytes)
                .unwrap_or_else(|| InputError::new("body", format!("not valid JSON: {e}"))))
        }
    };
    match value {
        Value::Object(map) => Ok(map),
        other => Err(InputError::new(
            "body",
            format!("expected a JSON object, got {}", kind(&other)),
        )),
    }
}

/// Marks a value that was a non-finite number token in the raw body.
const NON_FINITE_MARK: &str = "\u{0}entwine-non-finite\u{0}";

/// The field holding the first non-finite number of a body that strict JSON refused, if that is
/// why it was refused.
fn non_finite_field(bytes: &[u8]) -> Option<InputError> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut marked = String::with_capacity(text.len());
    let mut found = None;
    let mut chars = text.char_indices().peekable();
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        if in_string {
            marked.push(c);
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        marked.push(escaped);
                    }
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        let token_end = |start: usize| {
            text[start..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || "+-.".contains(ch)))
                .map_or(text.len(), |n| start + n)
        };
        match c {
            '"' => {
                in_string = true;
                marked.push(c);
            }
            '-' | '0'..='9' | 'N' | 'I' => {
                let end = token_end(i);
                let token = &text[i..end];
                let non_finite = matches!(token, "NaN" | "Infinity" | "-Infinity")
                    || token.parse::<f64>().is_ok_and(|f| f.is_infinite());
                if non_finite {
                    found.get_or_insert(token.to_owned());
                    marked.push('"');
                    marked.push_str(&NON_FINITE_MARK.replace('\u{0}', "\\u0000"));
                    marked.push('"');
                } else {
                    marked.push_str(token);
                }
                while chars.peek().is_some_and(|(j, _)| *j < end) {
                    chars.next();
                }
            }
            _ => marked.push(c),
        }
    }
    let token = found?;
    let value: Value = serde_json::from_str(&marked).ok()?;
    let path = find_mark(&value, "")?;
    Some(InputError::new(
        if path.is_empty() {
            "body".to_owned()
        } else {
            path
        },
        format!("must be a finite number, got {token}"),
    ))
}

fn find_mark(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s == NON_FINITE_MARK => Some(path.to_owned()),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            find_mark(v, &child)
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_mark(v, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// A JSON object being read, with the path of the object for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// Reads the top-level object.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self { map, prefix: "" }
    }

    /// The dotted path of `key` in the document.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// The value of `key`; missing and `null` are both "missing".
    pub fn required(&self, key: &str) -> Result<&'a Value, InputError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Err(InputError::new(self.path(key), "missing")),
            Some(v) => Ok(v),
        }
    }

    /// The value of `key`, or `None` when absent or `null`.
    pub fn optional(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The nested object under `key`, readable with `path` as its prefix.
    ///
    /// `path` must be `self.path(key)`; it is passed in so the caller owns the string.
    pub fn object(&self, key: &str, path: &'a str) -> Result<Fields<'a>, InputError> {
        match self.required(key)? {
            Value::Object(map) => Ok(Fields { map, prefix: path }),
            other => Err(InputError::new(
                self.path(key),
                format!("expected an object, got {}", kind(other)),
            )),
        }
    }

    /// A string field.
    pub fn string(&self, key: &str) -> Result<&'a str, InputError> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            other => Err(InputError::new(
                self.path(key),
                format!("expected a string, got {}", kind(other)),
            )),
        }
    }

    /// An integer field. A number with a zero fraction (`1700000000000.0`) is accepted, since
    /// clients that compute milliseconds as floats send those.
    pub fn integer(&self, key: &str) -> Result<i64, InputError> {
        let value = self.required(key)?;
        let err = |reason: String| InputError::new(self.path(key), reason);
        match value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(i)
                } else if n.is_u64() {
                    Err(err(format!("{n} is out of range")))
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.fract() == 0.0 && f.abs() < 9.0e15 {
                        // Exact: |f| < 2^53, so the cast neither rounds nor saturates.
                        Ok(f as i64)
                    } else {
                        Err(err(format!("expected an integer, got {n}")))
                    }
                }
            }
            other => Err(err(format!("expected an integer, got {}", kind(other)))),
        }
    }

    /// A finite number field. JSON has no NaN or infinity literals, but `1e999` parses to
    /// infinity, and a string such as `"NaN"` is rejected as a string.
    pub fn number(&self, key: &str) -> Result<f64, InputError> {
        match self.required(key)? {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(f),
                _ => Err(InputError::new(self.path(key), "must be a finite number")),
            },
            other => Err(InputError::new(
                self.path(key),
                format!("expected a number, got {}", kind(other)),
            )),
        }
    }
}

/// The JSON kind of a value, for error messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("test value is an object")
    }

    #[test]
    fn a_body_that_is_not_json_is_rejected_as_body() {
        let err = parse_object(b"{not json").unwrap_err();
        assert_eq!(err.field, "body");
        assert!(err.reason.starts_with("not valid JSON"), "{err}");
    }

    #[test]
    fn a_json_array_is_not_an_object() {
        let err = parse_object(b"[1,2]").unwrap_err();
        assert_eq!(
            err.to_string(),
            "body: expected a JSON object, got an array"
        );
    }

    #[test]
    fn integers_accept_integral_floats_and_reject_fractions() {
        let m = map(json!({"a": 17.0, "b": 17.5, "c": "17", "d": 18446744073709551615u64}));
        let f = Fields::new(&m);
        assert_eq!(f.integer("a"), Ok(17));
        assert_eq!(f.integer("b").unwrap_err().field, "b");
        assert_eq!(
            f.integer("c").unwrap_err().reason,
            "expected an integer, got a string"
        );
        assert!(f.integer("d").unwrap_err().reason.contains("out of range"));
        assert_eq!(f.integer("e").unwrap_err().reason, "missing");
    }

    #[test]
    fn nested_fields_are_named_by_their_dotted_path() {
        let m = map(json!({"data": {"x": "hot"}}));
        let f = Fields::new(&m);
        let data = f.object("data", "data").unwrap();
        assert_eq!(
            data.number("x").unwrap_err().to_string(),
            "data.x: expected a number, got a string"
        );
    }

    #[test]
    fn non_finite_numbers_are_named_by_their_field() {
        let cases: [(&[u8], &str, &str); 5] = [
            (br#"{"x": 1e999}"#, "x", "1e999"),
            (br#"{"a": 1, "data": {"t": NaN}}"#, "data.t", "NaN"),
            (
                br#"{"data": {"e": -Infinity, "t": 2}}"#,
                "data.e",
                "-Infinity",
            ),
            (
                br#"{"s": "NaN \" Infinity", "v": [1, Infinity]}"#,
                "v[1]",
                "Infinity",
            ),
            (br#"{"a": -1e400}"#, "a", "-1e400"),
        ];
        for (body, field, token) in cases {
            let err = parse_object(body).unwrap_err();
            assert_eq!(err.field, field, "{}", String::from_utf8_lossy(body));
            assert_eq!(err.reason, format!("must be a finite number, got {token}"));
        }
    }

    #[test]
    fn strings_that_spell_nan_are_not_numbers() {
        let m = parse_object(br#"{"x": "NaN"}"#).unwrap();
        assert_eq!(
            Fields::new(&m).number("x").unwrap_err().reason,
            "expected a number, got a string"
        );
        // A body broken for another reason is still reported as such.
        assert!(parse_object(br#"{"x": NaN,,}"#)
            .unwrap_err()
            .reason
            .starts_with("not valid JSON"));
    }
}
