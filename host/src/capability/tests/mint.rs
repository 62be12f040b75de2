//! Known answers (computed independently in Python), mint → verify, mint request validation.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::super::mint::mint_with_random;
use super::super::*;
use super::*;

// ---- known answers -------------------------------------------------------------------------

/// The whole bearer string, computed independently in Python (hmac + json with Go's layout).
#[test]
fn mint_known_answer() {
    let r = MintRequest {
        subject: "agent-1".into(),
        tenant: Some("acme".into()),
        ttl_seconds: Some(3600),
        tools: vec!["read_*".into(), "list_vendors".into()],
        max_calls: Some(5),
        ..MintRequest::default()
    };
    let m = mint_with_random(&key(), &r, NOW, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.jti, "ZVPxAAECAwQFBgcICQoLDA");
    assert_eq!(m.root_jti, m.jti);
    assert_eq!(m.expires_at, Some(NOW + 3600));
    assert_eq!(
        decode(&m.token).sig,
        "ojnVJ1U1oKMl4TcfOFw4SebA0r87dMVOciMWuIho4NY"
    );
    assert_eq!(
        m.token,
        "eyJ2Ijo0LCJqdGkiOiJaVlB4QUFFQ0F3UUZCZ2NJQ1FvTERBIiwicm9vdF9qdGkiOiJaVlB4QUFFQ0F3UUZCZ2NJQ1FvTERBIiwiaXNzIjoiaW50ZW50Z2F0ZSIsInRlbmFudCI6ImFjbWUiLCJ6b25lIjoiZGVmYXVsdCIsInN1YiI6ImFnZW50LTEiLCJpYXQiOjE3MDAwMDAwMDAsImNhdiI6W3sidCI6ImFnZW50X2xvY2siLCJhZ2VudCI6ImFnZW50LTEifSx7InQiOiJleHAiLCJleHAiOjE3MDAwMDM2MDB9LHsidCI6InRvb2xfYWxsb3ciLCJ0b29scyI6WyJyZWFkXyoiLCJsaXN0X3ZlbmRvcnMiXX0seyJ0IjoibWF4X2NhbGxzIiwibWF4X2NhbGxzIjo1fV0sInNpZyI6Im9qblZKMVUxb0tNbDRUY2ZPRnc0U2ViQTByODdkTVZPY2lNV3VJaG80TlkifQ"
    );
}

/// Go escaping inside the signed bytes (HTML characters, U+2028, control, non-ASCII), signed by
/// an independent Python emulation of Go's encoder.
#[test]
fn signature_known_answer_with_escaping() {
    let sub = "bøt<&>\u{2028}x\u{1}";
    let mut t = Token {
        v: 4,
        jti: "J".into(),
        root_jti: "R".into(),
        iss: "intentgate".into(),
        tenant: "default".into(),
        zone: "default".into(),
        sub: sub.into(),
        iat: NOW,
        nbf: NOW + 100,
        cav: vec![Caveat::agent_lock(sub), Caveat::tool_deny(["rm<*>", "☕"])],
        sig: String::new(),
    };
    t.sign(&key());
    assert_eq!(t.sig, "xxrgfi0pfrx1KUvgx6_8wWdntJFevmDCBQdLCJ52g0M");
    let g = verifier()
        .authenticate(&t.encode(), NOW + 100, &fresh())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!g.allows_tool("rm<x>") && !g.allows_tool("☕") && g.allows_tool("ls"));
}

// ---- mint → verify -------------------------------------------------------------------------

#[test]
fn round_trip_surfaces_identity_and_limits() {
    let r = MintRequest {
        subject: "bot".into(),
        tenant: Some("acme".into()),
        zone: Some("finance".into()),
        ttl_seconds: Some(60),
        tools: vec!["read_*".into()],
        max_calls: Some(10),
        servers: vec!["erp*".into()],
        rate_per_min: Some(30),
        max_cents: Some(500),
        risk_max: None,
        step_up_at: Some((NOW - 5) as u64),
        callees: vec!["helper-*".into()],
        callee_zones: Vec::new(),
        nbf: None,
        resources: Vec::new(),
        prompts: Vec::new(),
    };
    let m = mint_ok(&r);
    let g = grant(&m.token);
    assert_eq!(
        (g.jti.as_str(), g.root_jti.as_str()),
        (m.jti.as_str(), m.jti.as_str())
    );
    assert_eq!(
        (g.tenant.as_str(), g.zone.as_str(), g.subject.as_str()),
        ("acme", "finance", "bot")
    );
    assert_eq!(g.caveat_count, 9);
    assert_eq!(g.expires_at, Some(NOW + 60));
    assert_eq!(
        (g.max_calls, g.rate_per_min, g.max_cents),
        (Some(10), Some(30), Some(500))
    );
    assert_eq!((g.risk_max, g.step_up_at), (None, Some(NOW - 5)));
    let kinds: Vec<String> = decode(&m.token).cav.into_iter().map(|c| c.t).collect();
    assert_eq!(
        kinds,
        [
            "agent_lock",
            "exp",
            "tool_allow",
            "max_calls",
            "mcp_allow",
            "rate_limit",
            "max_cost",
            "step_up",
            "callee_allow"
        ]
    );
    let ok = CallContext {
        kind: Kind::Tool,
        tool: "read_x",
        agent: Some("bot"),
        server: Some("erp-1"),
        callee: Some(("helper-1", None)),
        risk: None,
        template: false,
        own_name: None,
    };
    assert_eq!(g.authorize(&ok), Ok(()));
}

#[test]
fn minimal_token_has_agent_lock_only_and_defaults() {
    let m = mint_ok(&req("bot"));
    let t = decode(&m.token);
    assert_eq!(
        (t.iss.as_str(), t.tenant.as_str(), t.zone.as_str()),
        ("intentgate", "default", "default")
    );
    assert_eq!(t.cav, vec![Caveat::agent_lock("bot")]);
    assert_eq!(m.expires_at, None);
    let g = grant(&m.token);
    assert_eq!(g.authorize(&CallContext::tool("anything")), Ok(()));
    assert!(g.max_calls.is_none() && g.risk_max.is_none() && g.expires_at.is_none());
    // The jti starts with the 4-byte big-endian mint time.
    let id = URL_SAFE_NO_PAD.decode(&m.jti).unwrap_or_default();
    assert_eq!(id.len(), 16);
    assert_eq!(id[..4], (NOW as u32).to_be_bytes());
    assert_ne!(mint_ok(&req("bot")).jti, m.jti);
}

#[test]
fn resources_and_prompts_mint_their_allow_caveats() {
    let m = mint_ok(&MintRequest {
        tools: vec!["echo".into()],
        resources: vec!["file:///public/*".into()],
        prompts: vec!["greet".into()],
        ..req("bot")
    });
    let kinds: Vec<String> = decode(&m.token).cav.iter().map(|c| c.t.clone()).collect();
    assert_eq!(
        kinds,
        ["agent_lock", "tool_allow", "resource_allow", "prompt_allow"]
    );
    let g = grant(&m.token);
    assert!(g.allows(Kind::Resource, "file:///public/a") && !g.allows(Kind::Resource, "x://y"));
    assert!(g.allows(Kind::Prompt, "greet") && !g.allows(Kind::Prompt, "other"));
    let bad = mint(
        &key(),
        &MintRequest {
            prompts: vec!["[x".into()],
            ..req("bot")
        },
        NOW,
    );
    assert!(matches!(
        bad,
        Err(MintError::InvalidPattern {
            field: "prompts",
            ..
        })
    ));
}

#[test]
fn mint_validation_errors() {
    let k = key();
    let bad = |r: MintRequest| mint(&k, &r, NOW).err();
    assert_eq!(bad(req("")), Some(MintError::EmptySubject));
    assert_eq!(
        bad(req("a\nb")),
        Some(MintError::InvalidSubject {
            max: MAX_SUBJECT_BYTES
        })
    );
    assert_eq!(
        bad(req(&"x".repeat(257))),
        Some(MintError::InvalidSubject {
            max: MAX_SUBJECT_BYTES
        })
    );
    for t in ["", "a b", "ü", &"x".repeat(65)] {
        let r = MintRequest {
            tenant: Some(t.into()),
            ..req("b")
        };
        assert!(
            matches!(
                bad(r),
                Some(MintError::InvalidName {
                    field: "tenant",
                    ..
                })
            ),
            "{t:?}"
        );
    }
    let r = MintRequest {
        zone: Some("a/b".into()),
        ..req("b")
    };
    assert!(matches!(
        bad(r),
        Some(MintError::InvalidName { field: "zone", .. })
    ));
    let r = MintRequest {
        callee_zones: vec!["a b".into()],
        ..req("b")
    };
    assert!(matches!(
        bad(r),
        Some(MintError::InvalidName {
            field: "callee_zones",
            ..
        })
    ));
    // Caveats the gateway cannot evaluate are refused by name, with the reason.
    for (r, field) in [
        (
            MintRequest {
                risk_max: Some(50),
                ..req("b")
            },
            "risk_max",
        ),
        (
            MintRequest {
                callees: vec!["crm".into()],
                callee_zones: vec!["ops".into()],
                ..req("b")
            },
            "callee_zones",
        ),
    ] {
        let e = bad(r);
        assert!(
            matches!(e, Some(MintError::Unsupported { field: f, .. }) if f == field),
            "{e:?}"
        );
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.starts_with(field) && text.contains("not supported"),
            "{text}"
        );
    }
    for p in ["[abc", "x\\", ""] {
        let r = MintRequest {
            tools: vec!["ok".into(), p.into()],
            ..req("b")
        };
        assert!(
            matches!(
                bad(r),
                Some(MintError::InvalidPattern { field: "tools", .. })
            ),
            "{p:?}"
        );
    }
    let r = MintRequest {
        servers: vec!["[".into()],
        ..req("b")
    };
    assert!(matches!(
        bad(r),
        Some(MintError::InvalidPattern {
            field: "servers",
            ..
        })
    ));
    let r = MintRequest {
        callees: vec!["x".repeat(513)],
        ..req("b")
    };
    assert!(matches!(
        bad(r),
        Some(MintError::InvalidPattern {
            field: "callees",
            ..
        })
    ));
    for ttl in [0, MAX_TTL_SECONDS + 1, u64::MAX] {
        let r = MintRequest {
            ttl_seconds: Some(ttl),
            ..req("b")
        };
        assert_eq!(
            bad(r),
            Some(MintError::TtlOutOfRange {
                max: MAX_TTL_SECONDS
            })
        );
    }
    assert_eq!(
        bad(MintRequest {
            max_calls: Some(0),
            ..req("b")
        }),
        Some(MintError::ZeroLimit { field: "max_calls" })
    );
    assert_eq!(
        bad(MintRequest {
            rate_per_min: Some(0),
            ..req("b")
        }),
        Some(MintError::ZeroLimit {
            field: "rate_per_min"
        })
    );
    assert_eq!(
        bad(MintRequest {
            max_cents: Some(u64::MAX),
            ..req("b")
        }),
        Some(MintError::OutOfRange { field: "max_cents" })
    );
    assert_eq!(
        bad(MintRequest {
            step_up_at: Some(0),
            ..req("b")
        }),
        Some(MintError::OutOfRange {
            field: "step_up_at"
        })
    );
    let r = MintRequest {
        nbf: Some((NOW + 10) as u64),
        ttl_seconds: Some(10),
        ..req("b")
    };
    assert_eq!(bad(r), Some(MintError::OutOfRange { field: "nbf" }));
    assert_eq!(
        mint(&k, &req("b"), 0).err(),
        Some(MintError::OutOfRange { field: "now" })
    );
    let huge = MintRequest {
        tools: (0..200)
            .map(|i| format!("{i}{}", "t".repeat(100)))
            .collect(),
        ..req("b")
    };
    assert!(matches!(bad(huge), Some(MintError::TooLarge { .. })));
    // Zero is a meaningful ceiling for max_cents (free tools only).
    assert!(
        bad(MintRequest {
            max_cents: Some(0),
            ..req("b")
        })
        .is_none()
    );
}

#[test]
fn mint_request_deserializes_strictly() {
    let r: MintRequest =
        serde_json::from_value(json!({"subject": "s", "ttl_seconds": 5, "tools": ["a"]}))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.subject.as_str(), r.ttl_seconds, r.tools.len()),
        ("s", Some(5), 1)
    );
    assert!(serde_json::from_value::<MintRequest>(json!({"subject": "s", "max_call": 5})).is_err());
    assert!(
        serde_json::from_value::<MintRequest>(json!({"subject": "s", "max_calls": -1})).is_err()
    );
}

#[test]
fn debug_output_never_shows_the_token_or_signature() {
    let m = mint_ok(&req("bot"));
    let sig = decode(&m.token).sig;
    let shown = format!("{m:?} {:?}", decode(&m.token));
    assert!(
        !shown.contains(&m.token) && !shown.contains(&sig),
        "{shown}"
    );
}
