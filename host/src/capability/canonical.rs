//! The canonical bytes that the HMAC chain signs: the compact JSON that Go's `encoding/json`
//! writes for the token payload and caveat structs of the original gateway (WIRE.md).
//!
//! Fields in declaration order, `omitempty` fields left out when empty/zero, no whitespace, and
//! Go's string escaping (HTML-safe: `<` `>` `&` as `\u003c` `\u003e` `\u0026`; U+2028/U+2029
//! escaped; `\b` `\f` `\n` `\r` `\t` `\"` `\\` short forms as Go ≥ 1.22 writes them; other
//! control characters as `\u00xx`; everything else, DEL and non-ASCII included, raw).
//!
//! This module must never use serde for these bytes: one changed byte invalidates every token.

use super::token::{Caveat, Token};

/// Canonical bytes of the payload: the token without `cav` and `sig` (seeds the chain).
pub(crate) fn payload(t: &Token) -> Vec<u8> {
    let mut o = Obj::new();
    write_payload_fields(&mut o, t);
    o.finish()
}

/// Canonical bytes of one caveat (one step of the chain).
pub(crate) fn caveat(c: &Caveat) -> Vec<u8> {
    let mut o = Obj::new();
    write_caveat_fields(&mut o, c);
    o.finish()
}

/// The whole token as Go would marshal it (payload fields, `cav`, `sig`): the wire form we mint.
pub(crate) fn token(t: &Token) -> Vec<u8> {
    let mut o = Obj::new();
    write_payload_fields(&mut o, t);
    if !t.cav.is_empty() {
        o.key("cav");
        o.out.push(b'[');
        for (i, c) in t.cav.iter().enumerate() {
            if i > 0 {
                o.out.push(b',');
            }
            o.out.extend_from_slice(&caveat(c));
        }
        o.out.push(b']');
    }
    o.str("sig", &t.sig);
    o.finish()
}

fn write_payload_fields(o: &mut Obj, t: &Token) {
    o.int("v", t.v);
    o.str("jti", &t.jti);
    o.str("root_jti", &t.root_jti);
    o.str("iss", &t.iss);
    o.str("tenant", &t.tenant);
    o.str("zone", &t.zone);
    o.str("sub", &t.sub);
    o.int("iat", t.iat);
    o.int_omitempty("nbf", t.nbf);
}

fn write_caveat_fields(o: &mut Obj, c: &Caveat) {
    o.str("t", &c.t);
    o.list_omitempty("tools", &c.tools);
    o.str_omitempty("agent", &c.agent);
    o.int_omitempty("exp", c.exp);
    o.int_omitempty("max_calls", c.max_calls);
    o.int_omitempty("step_up_at", c.step_up_at);
    o.list_omitempty("callees", &c.callees);
    o.list_omitempty("callee_zones", &c.callee_zones);
    o.list_omitempty("servers", &c.servers);
    o.int_omitempty("rate_per_min", c.rate_per_min);
    o.int_omitempty("max_cents", c.max_cents);
    o.int_omitempty("risk_max", c.risk_max);
}

/// A JSON object being written field by field.
struct Obj {
    out: Vec<u8>,
    first: bool,
}

impl Obj {
    fn new() -> Self {
        Obj {
            out: vec![b'{'],
            first: true,
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.push(b'}');
        self.out
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        string(&mut self.out, name);
        self.out.push(b':');
    }

    fn str(&mut self, name: &str, v: &str) {
        self.key(name);
        string(&mut self.out, v);
    }

    fn str_omitempty(&mut self, name: &str, v: &str) {
        if !v.is_empty() {
            self.str(name, v);
        }
    }

    fn int(&mut self, name: &str, v: i64) {
        self.key(name);
        self.out.extend_from_slice(v.to_string().as_bytes());
    }

    fn int_omitempty(&mut self, name: &str, v: i64) {
        if v != 0 {
            self.int(name, v);
        }
    }

    fn list_omitempty(&mut self, name: &str, v: &[String]) {
        if v.is_empty() {
            return;
        }
        self.key(name);
        self.out.push(b'[');
        for (i, s) in v.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            string(&mut self.out, s);
        }
        self.out.push(b']');
    }
}

/// Appends `s` as a JSON string exactly as Go's `encoding/json` does with HTML escaping on.
fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{0}'..='\u{1f}' | '<' | '>' | '&' => {
                let b = ch as u8;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            _ => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, s);
        String::from_utf8(out).unwrap_or_default()
    }

    // Expected values are what Go's json.Marshal writes (go1.22+), checked by hand against
    // encoding/json's appendString.
    #[test]
    fn go_string_escaping() {
        assert_eq!(enc("plain_tool-1.x"), r#""plain_tool-1.x""#);
        assert_eq!(enc("a<b>c&d"), r#""a\u003cb\u003ec\u0026d""#);
        assert_eq!(enc("q\"b\\s/"), r#""q\"b\\s/""#);
        assert_eq!(enc("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(
            enc("\u{0}\u{1}\u{1f}\u{b}"),
            r#""\u0000\u0001\u001f\u000b""#
        );
        assert_eq!(enc("\u{7f}"), "\"\u{7f}\"");
        assert_eq!(enc("x\u{2028}y\u{2029}"), r#""x\u2028y\u2029""#);
        assert_eq!(enc("café ☕ 𝄞"), "\"café ☕ 𝄞\"");
        assert_eq!(enc("\u{85}\u{feff}"), "\"\u{85}\u{feff}\"");
        assert_eq!(enc(""), r#""""#);
    }

    fn sample_token() -> Token {
        Token {
            v: 4,
            jti: "J".into(),
            root_jti: "R".into(),
            iss: "intentgate".into(),
            tenant: "default".into(),
            zone: "default".into(),
            sub: "bot<1>".into(),
            iat: 1_700_000_000,
            nbf: 0,
            cav: vec![],
            sig: "S".into(),
        }
    }

    #[test]
    fn payload_order_and_omitempty() {
        let mut t = sample_token();
        assert_eq!(
            String::from_utf8_lossy(&payload(&t)),
            r#"{"v":4,"jti":"J","root_jti":"R","iss":"intentgate","tenant":"default","zone":"default","sub":"bot\u003c1\u003e","iat":1700000000}"#
        );
        t.nbf = -5;
        t.cav.push(Caveat::exp(9));
        let p = String::from_utf8_lossy(&payload(&t)).into_owned();
        assert!(p.ends_with(r#""iat":1700000000,"nbf":-5}"#), "{p}");
        assert!(!p.contains("cav") && !p.contains("sig"));
    }

    #[test]
    fn caveat_order_and_omitempty() {
        let c = Caveat {
            t: "x".into(),
            tools: vec!["a".into(), "b*".into()],
            agent: "ag".into(),
            exp: 1,
            max_calls: 2,
            step_up_at: 3,
            callees: vec!["c".into()],
            callee_zones: vec!["z".into()],
            servers: vec!["s".into()],
            rate_per_min: 4,
            max_cents: 5,
            risk_max: 6,
        };
        assert_eq!(
            String::from_utf8_lossy(&caveat(&c)),
            r#"{"t":"x","tools":["a","b*"],"agent":"ag","exp":1,"max_calls":2,"step_up_at":3,"callees":["c"],"callee_zones":["z"],"servers":["s"],"rate_per_min":4,"max_cents":5,"risk_max":6}"#
        );
        assert_eq!(
            String::from_utf8_lossy(&caveat(&Caveat::bare("max_calls"))),
            r#"{"t":"max_calls"}"#
        );
        assert_eq!(
            String::from_utf8_lossy(&caveat(&Caveat::tool_allow(["read_*"]))),
            r#"{"t":"tool_allow","tools":["read_*"]}"#
        );
    }

    #[test]
    fn whole_token_is_go_marshal_order() {
        let mut t = sample_token();
        t.sub = "s".into();
        t.cav = vec![Caveat::agent_lock("s"), Caveat::exp(1_700_000_600)];
        assert_eq!(
            String::from_utf8_lossy(&token(&t)),
            r#"{"v":4,"jti":"J","root_jti":"R","iss":"intentgate","tenant":"default","zone":"default","sub":"s","iat":1700000000,"cav":[{"t":"agent_lock","agent":"s"},{"t":"exp","exp":1700000600}],"sig":"S"}"#
        );
    }
}
