//! `Mcp-Param-*` headers (SEP-2243, MCP 2026-07-28): a tool marks arguments with `x-mcp-header`
//! in its input schema, and a client mirrors each marked argument in a `Mcp-Param-<Name>`
//! header so intermediaries can route on it.
//!
//! Like the other routing headers ([`super::headers`]): a client's `Mcp-Param-*` header must
//! agree with the body or the request is refused (HTTP 400, `-32020`) before any check runs
//! ([`check`]); decisions read the body only; and the headers sent upstream are computed from
//! the forwarded arguments and the upstream's own schema ([`for_upstream`]), never copied from
//! the client. This module must never let a header stand in for a body value.

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::headers::{decode_value, encode_value};
use super::jsonrpc::{RpcError, code};

/// A tool's marked arguments: `(argument, header suffix)`.
pub type Marked = Vec<(String, String)>;

/// Most marked arguments kept per tool (a schema is the upstream's, not trusted to be small).
const MAX_MARKED: usize = 32;

/// The arguments a tool's input schema marks with `x-mcp-header`.
pub fn marked(input_schema: &Value) -> Marked {
    let Some(props) = input_schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    props
        .iter()
        .filter_map(|(arg, schema)| {
            let suffix = schema.get("x-mcp-header")?.as_str()?;
            let valid = !suffix.is_empty()
                && suffix.len() <= 64
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            valid.then(|| (arg.clone(), suffix.to_owned()))
        })
        .take(MAX_MARKED)
        .collect()
}

/// The text an argument's header carries: a string as is, a number or boolean as JSON text.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

fn mismatch(why: String) -> RpcError {
    RpcError::new(code::HEADER_MISMATCH, why)
}

/// Checks a client's `Mcp-Param-*` headers against the call's arguments: each marked argument
/// present in the body must have its header, once, whose (decoded) value equals it; a header
/// without its argument disagrees too.
pub fn check(
    headers: &HeaderMap,
    marked: &Marked,
    arguments: &Map<String, Value>,
) -> Result<(), RpcError> {
    for (arg, suffix) in marked {
        let name = format!("mcp-param-{}", suffix.to_ascii_lowercase());
        let mut all = headers.get_all(name.as_str()).iter();
        let header = all.next();
        if all.next().is_some() {
            return Err(mismatch(format!(
                "Mcp-Param-{suffix} header appears more than once"
            )));
        }
        let body = arguments.get(arg).filter(|v| !v.is_null());
        match (body, header) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(mismatch(format!(
                    "Mcp-Param-{suffix} header is missing but {arg:?} is in the body"
                )));
            }
            (None, Some(_)) => {
                return Err(mismatch(format!(
                    "Mcp-Param-{suffix} header is present but {arg:?} is not in the body"
                )));
            }
            (Some(v), Some(h)) => {
                let decoded = h.to_str().ok().map(str::trim).and_then(decode_value);
                if decoded.is_none() || decoded != text_of(v) {
                    return Err(mismatch(format!(
                        "Mcp-Param-{suffix} header does not match the body's {arg:?} argument"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The `Mcp-Param-*` headers for arguments about to be sent to an upstream whose schema marks
/// `marked`.
pub fn for_upstream(
    marked: &Marked,
    arguments: Option<&Map<String, Value>>,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(arguments) = arguments else {
        return Vec::new();
    };
    marked
        .iter()
        .filter_map(|(arg, suffix)| {
            let text = text_of(arguments.get(arg)?)?;
            let name = HeaderName::from_bytes(format!("mcp-param-{suffix}").as_bytes()).ok()?;
            let value = HeaderValue::from_str(&encode_value(&text)).ok()?;
            Some((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "n": {"type": "integer", "x-mcp-header": "N"},
            "bad": {"type": "string", "x-mcp-header": "has space"},
            "plain": {"type": "string"}
        }})
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn marked_arguments_are_read_from_the_schema() {
        let mut m = marked(&schema());
        m.sort();
        assert_eq!(
            m,
            vec![("n".into(), "N".into()), ("region".into(), "Region".into())]
        );
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let m = marked(&schema());
        let args = json!({"region": "Hello", "n": 3})
            .as_object()
            .cloned()
            .expect("obj");
        let ok = headers(&[
            ("mcp-param-region", "=?base64?SGVsbG8=?="),
            ("Mcp-Param-N", "3"),
        ]);
        assert!(check(&ok, &m, &args).is_ok());
        let literal = headers(&[("mcp-param-region", "Hello"), ("mcp-param-n", "3")]);
        assert!(check(&literal, &m, &args).is_ok());
        for bad in [
            headers(&[
                ("mcp-param-region", "=?base64?SGVsbG8?="),
                ("mcp-param-n", "3"),
            ]),
            headers(&[
                ("mcp-param-region", "=?base64?SGVs!!!bG8=?="),
                ("mcp-param-n", "3"),
            ]),
            headers(&[("mcp-param-n", "3")]),
            headers(&[("mcp-param-region", "Hello"), ("mcp-param-n", "4")]),
            headers(&[
                ("mcp-param-region", "Hello"),
                ("mcp-param-region", "Hello"),
                ("mcp-param-n", "3"),
            ]),
        ] {
            let e = check(&bad, &m, &args).expect_err("mismatch");
            assert_eq!(e.code, code::HEADER_MISMATCH);
        }
        let without = json!({"n": 3}).as_object().cloned().expect("obj");
        assert!(
            check(
                &headers(&[("mcp-param-n", "3"), ("mcp-param-region", "x")]),
                &m,
                &without
            )
            .is_err()
        );
    }

    #[test]
    fn upstream_headers_are_computed_from_the_arguments() {
        let m = marked(&schema());
        let args = json!({"region": "Zürich", "n": 3})
            .as_object()
            .cloned()
            .expect("obj");
        let mut out: Vec<(String, String)> = for_upstream(&m, Some(&args))
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect();
        out.sort();
        assert_eq!(
            out,
            vec![
                ("mcp-param-n".into(), "3".into()),
                ("mcp-param-region".into(), "=?base64?WsO8cmljaA==?=".into())
            ]
        );
    }
}
