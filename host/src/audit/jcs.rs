//! RFC 8785 JSON Canonicalization Scheme (JCS): the byte form an audit event is hashed in.
//!
//! Two entry points produce the same bytes for the same JSON data:
//! - [`canonicalize`] for a `serde_json::Value` built in-process (the writer uses it);
//! - [`canonicalize_text`] for JSON *text* (the offline verifier uses it). It parses numbers with
//!   Rust's correctly rounded `str::parse::<f64>`, so the text the writer produced always
//!   re-canonicalizes to identical bytes, independent of how `serde_json` was compiled.
//!
//! Rules (RFC 8785 §3.2): no whitespace; object members sorted by the UTF-16 code units of their
//! names; strings escaped as ECMAScript `JSON.stringify` does (`\"`, `\\`, `\b \f \n \r \t`, other
//! controls as `\u00xx` lowercase, everything else raw UTF-8); numbers are IEEE-754 doubles written
//! as ECMAScript `Number.prototype.toString` writes them. Integers within ±2^53 therefore print as
//! plain decimal integers; larger integers are rounded to the nearest double first (as the RFC
//! requires: `2^63` becomes `9223372036854775808` → `9223372036854776000`). Non-finite numbers
//! cannot occur in JSON; duplicate object names are rejected in text input.
//!
//! This module must never produce two different byte strings for one JSON value, and never accept
//! text that is not JSON.

use std::fmt::Write as _;

use serde_json::Value;

use super::AuditError;

/// Largest integer magnitude that an IEEE double represents exactly (2^53).
const MAX_SAFE: u64 = 1 << 53;

/// Canonical form of a `serde_json::Value`.
pub fn canonicalize(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_value(value, &mut out);
    out
}

pub(crate) fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                write_u64(u, out);
            } else if let Some(i) = n.as_i64() {
                write_i64(i, out);
            } else {
                // serde_json only holds finite doubles here.
                write_f64(n.as_f64().unwrap_or(0.0), out);
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| cmp_utf16(a.0, b.0));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_value(v, out);
            }
            out.push('}');
        }
    }
}

/// An unsigned integer as a JSON number (rounded to a double beyond 2^53, as JCS requires).
pub(crate) fn write_u64(n: u64, out: &mut String) {
    write_integer(false, n, out);
}

/// A signed integer as a JSON number (rounded to a double beyond ±2^53, as JCS requires).
pub(crate) fn write_i64(n: i64, out: &mut String) {
    write_integer(n < 0, n.unsigned_abs(), out);
}

fn write_integer(negative: bool, magnitude: u64, out: &mut String) {
    if magnitude <= MAX_SAFE {
        if negative && magnitude != 0 {
            out.push('-');
        }
        let _ = write!(out, "{magnitude}");
    } else {
        // Outside the exact range of a double: JCS serializes the double nearest to it.
        let f = magnitude as f64;
        write_f64(if negative { -f } else { f }, out);
    }
}

/// ECMAScript `Number.prototype.toString` for a finite double (ECMA-262 §6.1.6.1.20).
pub(crate) fn write_f64(x: f64, out: &mut String) {
    if x == 0.0 || !x.is_finite() {
        // -0 prints as "0"; non-finite values cannot be represented in JSON and never reach here.
        out.push('0');
        return;
    }
    if x < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` prints the shortest digit string that round-trips, as ECMAScript requires.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let mut digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    if digits.len() >= 16 {
        digits = even_on_tie(x.abs(), digits, exp);
    }
    let k = digits.len() as i32;
    let n = exp + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e >= 0 { '+' } else { '-' }, e.abs());
    }
}

/// ECMAScript breaks a tie between two shortest digit strings that both round-trip, with the
/// value exactly halfway between them, toward the even last digit; Rust's shortest formatting
/// may pick the other one. Ties need at least 16 digits (two neighbours 10^-k apart can both
/// round to one double only then), so only long digit strings are checked, against the exact
/// decimal expansion of the double (at most 767 significant digits).
fn even_on_tie(x: f64, digits: String, exp: i32) -> String {
    let exact = format!("{x:.800e}");
    let (mantissa, exact_exp) = exact.split_once('e').unwrap_or((exact.as_str(), "0"));
    if exact_exp.parse::<i32>().ok() != Some(exp) {
        return digits;
    }
    let exact_digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exact_digits = exact_digits.trim_end_matches('0');
    let k = digits.len();
    // Halfway: the exact value is `prefix` followed by a single 5.
    if exact_digits.len() != k + 1 || !exact_digits.ends_with('5') {
        return digits;
    }
    let below = &exact_digits[..k];
    let candidate = if digits == below {
        // Rounded down; the other neighbour is `below + 1` (skip a carry that changes length).
        let mut bytes = below.as_bytes().to_vec();
        let mut i = k;
        loop {
            if i == 0 {
                return digits;
            }
            i -= 1;
            if bytes[i] == b'9' {
                bytes[i] = b'0';
            } else {
                bytes[i] += 1;
                break;
            }
        }
        String::from_utf8(bytes).unwrap_or_default()
    } else {
        below.to_owned()
    };
    let odd = |d: &str| d.as_bytes().last().is_some_and(|b| (b - b'0') % 2 == 1);
    let round_trips = format!("{}.{}e{exp}", &candidate[..1], &candidate[1..])
        .parse::<f64>()
        .is_ok_and(|v| v == x);
    if odd(&digits) && !odd(&candidate) && round_trips {
        candidate
    } else {
        digits
    }
}

pub(crate) fn write_string(s: &str, out: &mut String) {
    out.push('"');
    // Runs of bytes that need no escape are copied whole: every byte of a multi-byte UTF-8
    // sequence is >= 0x80, so a run never ends inside a character.
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[run..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escape);
        }
        run = i + 1;
    }
    out.push_str(&s[run..]);
    out.push('"');
}

/// Orders object member names by their UTF-16 code units (RFC 8785 §3.2.3).
fn cmp_utf16(a: &str, b: &str) -> std::cmp::Ordering {
    // Below U+10000 (no 4-byte UTF-8 sequence, whose lead byte is >= 0xF0) UTF-8 byte order is
    // code point order, which is UTF-16 order there.
    if !a.bytes().chain(b.bytes()).any(|x| x >= 0xf0) {
        return a.as_bytes().cmp(b.as_bytes());
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

/// Canonical form of JSON text, leaving out the named members of the top-level object.
///
/// `skip_top_level` lets the offline verifier drop the chain fields (`id`, `hash`, `prev_hash`)
/// that an export line carries beside the hashed event body.
pub fn canonicalize_text(text: &str, skip_top_level: &[&str]) -> Result<String, AuditError> {
    let mut parser = Parser {
        src: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    };
    parser.skip_ws();
    let value = parser.value()?;
    parser.skip_ws();
    if parser.pos != parser.src.len() {
        return Err(parser.err("trailing characters after the JSON value"));
    }
    let value = match value {
        Tree::Object(members) if !skip_top_level.is_empty() => Tree::Object(
            members
                .into_iter()
                .filter(|(k, _)| !skip_top_level.contains(&k.as_str()))
                .collect(),
        ),
        other => other,
    };
    let mut out = String::with_capacity(text.len());
    value.write(&mut out);
    Ok(out)
}

/// A parsed JSON value that keeps numbers as doubles parsed exactly.
enum Tree {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Tree>),
    Object(Vec<(String, Tree)>),
}

impl Tree {
    fn write(mut self, out: &mut String) {
        match &mut self {
            Tree::Null => out.push_str("null"),
            Tree::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Tree::Number(f) => write_f64(*f, out),
            Tree::String(s) => write_string(s, out),
            Tree::Array(items) => {
                out.push('[');
                for (i, item) in std::mem::take(items).into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Tree::Object(members) => {
                let mut members = std::mem::take(members);
                members.sort_by(|a, b| cmp_utf16(&a.0, &b.0));
                out.push('{');
                for (i, (k, v)) in members.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(&k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// Nesting bound for text input, so a hostile file cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> AuditError {
        AuditError::Malformed(format!("JSON: {what} at byte {}", self.pos))
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> Result<(), AuditError> {
        if self.src[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self) -> Result<Tree, AuditError> {
        match self.src.get(self.pos) {
            Some(b'n') => self.eat("null").map(|_| Tree::Null),
            Some(b't') => self.eat("true").map(|_| Tree::Bool(true)),
            Some(b'f') => self.eat("false").map(|_| Tree::Bool(false)),
            Some(b'"') => self.string().map(Tree::String),
            Some(b'[') => self.array(),
            Some(b'{') => self.object(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("expected a JSON value")),
        }
    }

    fn enter(&mut self) -> Result<(), AuditError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.pos += 1;
        self.skip_ws();
        Ok(())
    }

    fn array(&mut self) -> Result<Tree, AuditError> {
        self.enter()?;
        let mut items = Vec::new();
        if self.src.get(self.pos) == Some(&b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Tree::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Tree::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self) -> Result<Tree, AuditError> {
        self.enter()?;
        let mut members: Vec<(String, Tree)> = Vec::new();
        // Names seen, for the duplicate check: a set, so an object of a million members costs
        // a million lookups, not a million squared comparisons.
        let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
        if self.src.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Tree::Object(members));
        }
        loop {
            if self.src.get(self.pos) != Some(&b'"') {
                return Err(self.err("expected a member name"));
            }
            let key = self.string()?;
            if !names.insert(key.clone()) {
                return Err(self.err("duplicate member name"));
            }
            self.skip_ws();
            if self.src.get(self.pos) != Some(&b':') {
                return Err(self.err("expected ':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self.value()?;
            members.push((key, value));
            self.skip_ws();
            match self.src.get(self.pos) {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Tree::Object(members));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn number(&mut self) -> Result<Tree, AuditError> {
        let start = self.pos;
        if self.src.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        match self.src.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        if self.src.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if !matches!(self.src.get(self.pos), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.src.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.src.get(self.pos) {
                self.pos += 1;
            }
            if !matches!(self.src.get(self.pos), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        let f: f64 = self.text[start..self.pos]
            .parse()
            .map_err(|_| self.err("invalid number"))?;
        if !f.is_finite() {
            return Err(self.err("number out of range"));
        }
        Ok(Tree::Number(f))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn hex4(&mut self) -> Result<u32, AuditError> {
        let hex = self
            .text
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let v = u32::from_str_radix(hex, 16).map_err(|_| self.err("bad \\u escape"))?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.err("bad \\u escape"));
        }
        self.pos += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, AuditError> {
        self.pos += 1; // opening quote
        let mut s = String::new();
        loop {
            let run_start = self.pos;
            while let Some(&b) = self.src.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // `text` is valid UTF-8 and we only stopped at ASCII bytes, so this slice is whole.
            s.push_str(&self.text[run_start..self.pos]);
            match self.src.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(s);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let esc = *self
                        .src
                        .get(self.pos)
                        .ok_or_else(|| self.err("bad escape"))?;
                    self.pos += 1;
                    match esc {
                        b'"' => s.push('"'),
                        b'\\' => s.push('\\'),
                        b'/' => s.push('/'),
                        b'b' => s.push('\u{08}'),
                        b'f' => s.push('\u{0c}'),
                        b'n' => s.push('\n'),
                        b'r' => s.push('\r'),
                        b't' => s.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&hi) {
                                if !self.src[self.pos..].starts_with(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(self.err("lone surrogate"));
                            } else {
                                hi
                            };
                            s.push(char::from_u32(c).ok_or_else(|| self.err("bad code point"))?);
                        }
                        _ => return Err(self.err("bad escape")),
                    }
                }
                _ => return Err(self.err("unterminated string")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The duplicate check holds for a large object (it looks names up in a set): the last
    /// member repeating the first of 100,000 is refused, the object without it accepted.
    #[test]
    fn a_duplicate_among_many_members_is_refused() {
        let members: Vec<String> = (0..100_000).map(|i| format!("\"k{i}\":0")).collect();
        let fine = format!("{{{}}}", members.join(","));
        assert!(canonicalize_text(&fine, &[]).is_ok());
        let twice = format!("{{{},\"k0\":1}}", members.join(","));
        assert!(canonicalize_text(&twice, &[]).is_err());
    }

    /// A string's canonical form is what `JSON.stringify` writes, which `serde_json` writes
    /// too (the same escapes, lowercase `\u00xx`, everything else raw), for every control
    /// character, every character that is escaped, and runs around them.
    #[test]
    fn strings_are_escaped_as_json_stringify_escapes_them() {
        let mut samples: Vec<String> = (0u32..0x80)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b{c}{c}"))
            .collect();
        samples.extend(
            [
                "",
                "plain",
                "é\u{2028}€",
                "😀\"😀",
                "\u{7f}\u{80}\u{ffff}",
                "\\\\\n\n",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        for s in samples {
            let mut out = String::new();
            write_string(&s, &mut out);
            let expected = serde_json::to_string(&s).expect("string");
            assert_eq!(out, expected, "{s:?}");
        }
    }

    /// Member names in UTF-16 order, with and without characters beyond U+FFFF (where UTF-8
    /// order and UTF-16 order differ).
    #[test]
    fn names_are_ordered_by_utf16_code_units() {
        let names = [
            "a", "ab", "b", "\u{e000}", "😀", "\u{ffff}", "é", "", "\u{7f}",
        ];
        for a in names {
            for b in names {
                assert_eq!(
                    cmp_utf16(a, b),
                    a.encode_utf16().cmp(b.encode_utf16()),
                    "{a:?} {b:?}"
                );
            }
        }
        // U+1F600 is written with surrogates (0xD83D…), before U+E000 in UTF-16 order.
        assert_eq!(cmp_utf16("😀", "\u{e000}"), std::cmp::Ordering::Less);
    }

    fn num(bits: u64) -> String {
        let mut s = String::new();
        write_f64(f64::from_bits(bits), &mut s);
        s
    }

    /// RFC 8785 Appendix B: IEEE-754 bit patterns and their canonical text.
    #[test]
    fn rfc8785_appendix_b_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in cases {
            assert_eq!(num(*bits), *want, "bits {bits:#018x}");
        }
    }

    /// RFC 8785 §3.2.2: the worked example, from text and from a serde_json value.
    #[test]
    fn rfc8785_main_example() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50,
                      2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let want = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(canonicalize_text(input, &[]).expect("canonical"), want);
        // serde_json's default float parser is not correctly rounded (it reads
        // 333333333.33333329 one ulp off), so the value is built from exactly parsed doubles.
        let exact = |s: &str| Value::from(s.parse::<f64>().expect("f64"));
        let v = serde_json::json!({
            "numbers": [exact("333333333.33333329"), exact("1E30"), exact("4.50"), exact("2e-3"),
                        exact("0.000000000000000000000000001")],
            "string": "\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/",
            "literals": [null, true, false]
        });
        assert_eq!(canonicalize(&v), want);
    }

    /// RFC 8785 §3.2.3: member names sorted by UTF-16 code units.
    #[test]
    fn rfc8785_sorting_example() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let out = canonicalize_text(input, &[]).expect("canonical");
        let v: Value = serde_json::from_str(&out).expect("json");
        let order: Vec<&str> = out
            .match_indices("\":\"")
            .map(|(i, _)| {
                let rest = &out[i + 3..];
                &rest[..rest.find('"').unwrap_or(0)]
            })
            .collect();
        assert_eq!(
            order,
            [
                "Carriage Return",
                "One",
                "Control",
                "Latin Small Letter O With Diaeresis",
                "Euro Sign",
                "Emoji: Grinning Face",
                "Hebrew Letter Dalet With Dagesh"
            ]
        );
        assert_eq!(canonicalize(&v), out);
    }

    #[test]
    fn integers_and_large_integers() {
        let v: Value =
            serde_json::json!({"a": 9007199254740992u64, "b": -42, "c": 9223372036854775807i64});
        assert_eq!(
            canonicalize(&v),
            r#"{"a":9007199254740992,"b":-42,"c":9223372036854776000}"#
        );
        assert_eq!(
            canonicalize_text(r#"{"c":9223372036854775807,"b":-42}"#, &[]).expect("ok"),
            r#"{"b":-42,"c":9223372036854776000}"#
        );
    }

    #[test]
    fn text_is_idempotent_and_skips_top_level() {
        let v = serde_json::json!({"z": [1.5, "x\u{2028}"], "id": 7, "a": {"k": null}});
        let c = canonicalize(&v);
        assert_eq!(canonicalize_text(&c, &[]).expect("ok"), c);
        assert_eq!(
            canonicalize_text(&c, &["id"]).expect("ok"),
            "{\"a\":{\"k\":null},\"z\":[1.5,\"x\u{2028}\"]}"
        );
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "{",
            "{\"a\":1,}",
            "[1 2]",
            "01",
            "1.",
            "\"\\ud800\"",
            "{\"a\":1,\"a\":2}",
            "nul",
            "1e999",
            "\"\u{1}\"",
            "{} x",
        ] {
            assert!(canonicalize_text(bad, &[]).is_err(), "accepted {bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(canonicalize_text(&deep, &[]).is_err());
    }
}
