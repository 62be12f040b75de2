//! Decoding strictness, tampering with every signed field, and arbitrary input.

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::super::canonical;
use super::super::*;
use super::*;

// ---- decoding ---------------------------------------------------------------------------------

#[test]
fn decoding_accepts_any_field_order_whitespace_and_padding() {
    let m = mint_ok(&MintRequest {
        tools: vec!["a".into()],
        ..req("bot")
    });
    let raw = URL_SAFE_NO_PAD.decode(&m.token).unwrap_or_default();
    let v: Value = serde_json::from_slice(&raw).unwrap_or_default();
    let mut fields: Vec<(String, Value)> = v
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    fields.reverse();
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\n  {k:?} : {v}"))
        .collect();
    let text = format!("{{ {} \n}}\n", body.join(" ,"));
    assert!(auth(&raw_b64(&text)).is_ok(), "{text}");
    let padded = URL_SAFE.encode(text.as_bytes());
    assert!(auth(&padded).is_ok());
    // Escaped forms of the same strings are the same token.
    let escaped = text.replace("\"bot\"", "\"\\u0062ot\"");
    assert_ne!(escaped, text);
    assert!(auth(&raw_b64(&escaped)).is_ok());
}

#[test]
fn decoding_rejects_ambiguous_or_hostile_input() {
    let m = mint_ok(&req("bot"));
    let malformed = |t: &str| matches!(auth(t), Err(CapabilityError::Malformed(_)));
    assert_eq!(auth("").err(), Some(CapabilityError::Missing));
    assert!(malformed("!!!"));
    assert!(malformed(&raw_b64("[]")));
    assert!(malformed(&raw_b64("{\"v\":4}")));
    let text =
        String::from_utf8(URL_SAFE_NO_PAD.decode(&m.token).unwrap_or_default()).unwrap_or_default();
    assert!(auth(&raw_b64(&text)).is_ok(), "control");
    assert!(
        malformed(&raw_b64(&text.replacen(
            "{\"v\":4,",
            "{\"v\":4,\"v\":4,",
            1
        ))),
        "duplicate key"
    );
    assert!(malformed(&raw_b64(&text.replacen(
        "\"sub\":\"bot\"",
        "\"sub\":\"bot\",\"sub\":\"bot\"",
        1
    ))));
    assert!(
        malformed(&edit_json(&m.token, |v| v["extra"] = json!(1))),
        "unknown field"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["cav"][0]["extra"] = json!(1))),
        "unknown caveat field"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["iat"] = json!("1700000000"))),
        "wrong type"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["iat"] = json!(1.5))),
        "float"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["nbf"] = Value::Null)),
        "null"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["cav"][0]["max_calls"] = json!(1e30))),
        "huge number"
    );
    assert!(
        malformed(&edit_json(&m.token, |v| v["sub"] = json!(""))),
        "empty subject"
    );
    assert!(
        malformed(&raw_b64(&format!("{text} x"))),
        "trailing garbage"
    );
    assert!(
        malformed(&raw_b64(&text.replacen("\"bot\"", "\"\\ud800\"", 1))),
        "lone surrogate"
    );
    assert_eq!(
        auth(&edit_json(&m.token, |v| v["v"] = json!(3))).err(),
        Some(CapabilityError::UnsupportedVersion(3))
    );
    let big = "A".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(
        auth(&big).err(),
        Some(CapabilityError::TooLarge {
            len: MAX_TOKEN_BYTES + 1
        })
    );
    let many = edit_json(&m.token, |v| {
        v["cav"] = json!(vec![
            json!({"t": "max_calls", "max_calls": 1});
            MAX_CAVEATS + 1
        ])
    });
    assert_eq!(
        auth(&many).err(),
        Some(CapabilityError::TooManyCaveats(MAX_CAVEATS + 1))
    );
    let deep = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    assert!(malformed(&raw_b64(&deep)));
    let deep_obj = format!(
        "{{\"cav\":[{}{}]}}",
        "{\"t\":".repeat(2000),
        "}".repeat(2000)
    );
    assert!(malformed(&raw_b64(&deep_obj)));
    // A JSON array of the field values in declaration order is not a token.
    let as_array = json!([
        4,
        m.jti,
        m.jti,
        "intentgate",
        "default",
        "default",
        "bot",
        NOW,
        0,
        [],
        "x"
    ]);
    assert!(malformed(&raw_b64(&as_array.to_string())));
    let cav_array = edit_json(&m.token, |v| v["cav"] = json!([["agent_lock", [], "bot"]]));
    assert!(malformed(&cav_array));
}

// ---- tampering --------------------------------------------------------------------------------

/// A token with every caveat type, each field set, so that every field can be tampered with.
fn full_token() -> String {
    let m = mint_ok(&MintRequest {
        ttl_seconds: Some(600),
        tools: vec!["read_*".into()],
        max_calls: Some(10),
        servers: vec!["erp".into()],
        rate_per_min: Some(5),
        max_cents: Some(100),
        step_up_at: Some(NOW as u64),
        callees: vec!["h".into()],
        nbf: Some((NOW - 10) as u64),
        ..req("bot")
    });
    // Mint refuses risk_max and callee_zones; an SDK may still attenuate with them.
    attenuate(
        &m.token,
        vec![
            Caveat {
                risk_max: 50,
                ..Caveat::bare("risk_max")
            },
            Caveat {
                callees: vec!["h".into()],
                callee_zones: vec!["z".into()],
                ..Caveat::bare("callee_allow")
            },
            Caveat::tool_deny(["read_secret"]),
        ],
    )
}

#[test]
fn every_payload_field_is_signed() {
    let t = full_token();
    assert!(auth(&t).is_ok());
    let edits: [(&str, Value); 8] = [
        ("jti", json!("other")),
        ("root_jti", json!("other")),
        ("iss", json!("someone-else")),
        ("tenant", json!("globex")),
        ("zone", json!("admin")),
        ("sub", json!("root")),
        ("iat", json!(NOW - 1)),
        ("nbf", json!(NOW - 11)),
    ];
    for (field, value) in edits {
        let edited = edit_json(&t, |v| v[field] = value.clone());
        assert_eq!(
            auth(&edited).err(),
            Some(CapabilityError::BadSignature),
            "{field}"
        );
    }
    let no_nbf = edit_json(&t, |v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("nbf");
        }
    });
    assert_eq!(auth(&no_nbf).err(), Some(CapabilityError::BadSignature));
}

#[test]
fn every_caveat_field_is_signed() {
    let t = full_token();
    let cav = decode(&t).cav;
    let edits: [(&str, Value); 12] = [
        ("t", json!("tool_deny")),
        ("tools", json!(["*"])),
        ("agent", json!("root")),
        ("exp", json!(NOW + 99_999)),
        ("max_calls", json!(1000)),
        ("step_up_at", json!(NOW + 1)),
        ("callees", json!(["*"])),
        ("callee_zones", json!(["*"])),
        ("servers", json!(["*"])),
        ("rate_per_min", json!(1000)),
        ("max_cents", json!(99_999)),
        ("risk_max", json!(100)),
    ];
    for (field, value) in edits {
        let idx = cav
            .iter()
            .position(|c| {
                serde_json::from_slice::<Value>(&canonical::caveat(c))
                    .is_ok_and(|o| o.get(field).is_some())
            })
            .unwrap_or_else(|| panic!("no caveat sets {field}"));
        let edited = edit_json(&t, |v| v["cav"][idx][field] = value.clone());
        assert_eq!(
            auth(&edited).err(),
            Some(CapabilityError::BadSignature),
            "{field}"
        );
        // Adding the field to a caveat that did not have it is tampering too.
        let other = (idx + 1) % cav.len();
        let added = edit_json(&t, |v| v["cav"][other][field] = value.clone());
        assert_eq!(
            auth(&added).err(),
            Some(CapabilityError::BadSignature),
            "{field} added to {other}"
        );
    }
}

#[test]
fn caveats_cannot_be_dropped_reordered_or_duplicated() {
    let t = full_token();
    let n = decode(&t).cav.len();
    assert_eq!(n, 12);
    let with_cav = |f: &dyn Fn(&mut Vec<Value>)| {
        edit_json(&t, |v| {
            if let Some(list) = v["cav"].as_array_mut() {
                f(list);
            }
        })
    };
    for i in 0..n {
        let dropped = with_cav(&|l| {
            l.remove(i);
        });
        assert_eq!(
            auth(&dropped).err(),
            Some(CapabilityError::BadSignature),
            "drop {i}"
        );
        let duplicated = with_cav(&|l| {
            let c = l[i].clone();
            l.insert(i, c);
        });
        assert_eq!(
            auth(&duplicated).err(),
            Some(CapabilityError::BadSignature),
            "duplicate {i}"
        );
        if i + 1 < n {
            let swapped = with_cav(&|l| l.swap(i, i + 1));
            assert_eq!(
                auth(&swapped).err(),
                Some(CapabilityError::BadSignature),
                "swap {i}"
            );
        }
    }
    let all_gone = edit_json(&t, |v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("cav");
        }
    });
    assert_eq!(auth(&all_gone).err(), Some(CapabilityError::BadSignature));
}

#[test]
fn signature_must_be_exact_canonical_and_from_our_key() {
    let t = full_token();
    let sig = decode(&t).sig;
    let with_sig = |s: &str| edit_json(&t, |v| v["sig"] = json!(s));
    assert!(
        auth(&with_sig(&sig)).is_ok(),
        "control: same signature re-encoded"
    );
    assert_eq!(
        auth(&with_sig(&sig[..42])).err(),
        Some(CapabilityError::MalformedSignature)
    );
    assert_eq!(
        auth(&with_sig(&sig[..40])).err(),
        Some(CapabilityError::MalformedSignature)
    );
    assert_eq!(
        auth(&with_sig(&format!("{sig}="))).err(),
        Some(CapabilityError::MalformedSignature)
    );
    assert_eq!(
        auth(&with_sig(&format!("{sig}AA"))).err(),
        Some(CapabilityError::MalformedSignature)
    );
    assert_eq!(
        auth(&with_sig("")).err(),
        Some(CapabilityError::MalformedSignature)
    );
    // Flip one bit of the signature.
    let mut bytes = URL_SAFE_NO_PAD.decode(&sig).unwrap_or_default();
    bytes[0] ^= 1;
    assert_eq!(
        auth(&with_sig(&URL_SAFE_NO_PAD.encode(&bytes))).err(),
        Some(CapabilityError::BadSignature)
    );
    // Same bytes, non-zero trailing bits in the last character.
    let last = sig.chars().last().unwrap_or('A');
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let pos = alphabet.find(last).unwrap_or(0);
    let sloppy: String = alphabet
        .chars()
        .nth(pos | 1)
        .map(|c| format!("{}{c}", &sig[..42]))
        .unwrap_or_default();
    assert_eq!(
        auth(&with_sig(&sloppy)).err(),
        Some(CapabilityError::MalformedSignature)
    );
    // Another master key.
    let other = Verifier::new(
        MasterKey::from_bytes(&[9u8; 32]).unwrap_or_else(|e| panic!("{e}")),
        30,
    );
    assert_eq!(
        other.authenticate(&t, NOW, &fresh()).err(),
        Some(CapabilityError::BadSignature)
    );
}

#[test]
fn no_panic_on_arbitrary_input() {
    let t = full_token();
    let raw = URL_SAFE_NO_PAD.decode(&t).unwrap_or_default();
    // Every prefix of the JSON and of the bearer string, and byte-level corruption.
    for cut in (0..raw.len()).step_by(7) {
        let _ = auth(&URL_SAFE_NO_PAD.encode(&raw[..cut]));
        let _ = auth(&t[..cut.min(t.len())]);
    }
    for i in (0..raw.len()).step_by(3) {
        let mut r = raw.clone();
        r[i] ^= 0x5a;
        assert!(auth(&URL_SAFE_NO_PAD.encode(&r)).is_err());
    }
}
