//! Every caveat type allowed and denied, `exp`/`nbf` boundaries with leeway, revocation.

use super::super::*;
use super::*;

// ---- caveats: each allowed and denied --------------------------------------------------------

#[test]
fn tool_allow_and_deny() {
    let m = mint_ok(&MintRequest {
        tools: vec!["read_*".into(), "list_vendors".into()],
        ..req("bot")
    });
    let t = attenuate(&m.token, vec![Caveat::tool_deny(["read_secret*"])]);
    let g = grant(&t);
    assert_eq!(g.authorize(&CallContext::tool("read_invoice")), Ok(()));
    assert_eq!(g.authorize(&CallContext::tool("list_vendors")), Ok(()));
    assert_eq!(
        g.authorize(&CallContext::tool("send_email")),
        Err(CapabilityError::ToolNotAllowed {
            tool: "send_email".into(),
            caveat: 1
        })
    );
    assert_eq!(
        g.authorize(&CallContext::tool("read_secrets")),
        Err(CapabilityError::ToolDenied {
            tool: "read_secrets".into(),
            caveat: 2
        })
    );
    assert!(
        g.allows_tool("read_invoice")
            && !g.allows_tool("send_email")
            && !g.allows_tool("read_secret")
    );
    // A child's broader allow list does not widen the parent's.
    let wider = grant(&attenuate(&m.token, vec![Caveat::tool_allow(["*"])]));
    assert!(!wider.allows_tool("send_email"));
    // An allow caveat with no tools allows nothing.
    let none = grant(&attenuate(&m.token, vec![Caveat::bare("tool_allow")]));
    assert!(!none.allows_tool("read_invoice"));
}

/// With several upstreams a deny caveat matches the name as its upstream knows it too: a
/// token minted before the second upstream was configured keeps its `tool_deny`, while its
/// allow lists fail closed on the namespaced names.
#[test]
fn deny_caveats_see_through_an_upstreams_namespace() {
    let m = mint_ok(&MintRequest {
        tools: vec!["*".into()],
        ..req("bot")
    });
    let t = attenuate(
        &m.token,
        vec![
            Caveat::tool_deny(["delete_*"]),
            Caveat::scoped("resource_deny", ["file:///secret*"]),
        ],
    );
    let g = grant(&t);
    let namespaced = |kind, tool, own_name| CallContext {
        kind,
        tool,
        own_name: Some(own_name),
        server: Some("gh"),
        ..CallContext::default()
    };
    assert!(matches!(
        g.authorize(&namespaced(Kind::Tool, "gh__delete_repo", "delete_repo")),
        Err(CapabilityError::ToolDenied { .. })
    ));
    assert_eq!(
        g.authorize(&namespaced(Kind::Tool, "gh__read_repo", "read_repo")),
        Ok(())
    );
    assert!(matches!(
        g.authorize(&namespaced(
            Kind::Resource,
            "gh+file:///secret.txt",
            "file:///secret.txt"
        )),
        Err(CapabilityError::Denied { .. })
    ));
    // A tool_allow of the upstream's own names does not match the namespaced ones.
    let narrow = grant(&attenuate(&m.token, vec![Caveat::tool_allow(["read_*"])]));
    assert!(matches!(
        narrow.authorize(&namespaced(Kind::Tool, "gh__read_repo", "read_repo")),
        Err(CapabilityError::ToolNotAllowed { .. })
    ));
}

#[test]
fn resource_and_prompt_caveats_restrict_their_kind_only() {
    let m = mint_ok(&MintRequest {
        tools: vec!["read_*".into()],
        ..req("bot")
    });
    // Without resource or prompt caveats every resource and prompt is in scope (as before
    // those caveats existed), whatever the tool caveats say.
    let plain = grant(&m.token);
    assert_eq!(
        plain.authorize(&CallContext::of(Kind::Resource, "file:///etc/passwd")),
        Ok(())
    );
    assert!(plain.allows(Kind::Prompt, "anything") && !plain.allows_tool("send_email"));
    let t = attenuate(
        &m.token,
        vec![
            Caveat::scoped("resource_allow", ["file:///public/*", "note://*"]),
            Caveat::scoped("resource_deny", ["file:///public/secret*"]),
            Caveat::scoped("prompt_allow", ["summarize", "greet_*"]),
            Caveat::scoped("prompt_deny", ["greet_admin"]),
        ],
    );
    let g = grant(&t);
    let res = |uri| g.authorize(&CallContext::of(Kind::Resource, uri));
    let prompt = |name| g.authorize(&CallContext::of(Kind::Prompt, name));
    assert_eq!(res("file:///public/readme.md"), Ok(()));
    assert_eq!(res("note://a/b"), Ok(()));
    assert_eq!(
        res("file:///etc/passwd"),
        Err(CapabilityError::NotAllowed {
            kind: "resource",
            name: "file:///etc/passwd".into(),
            caveat: 2
        })
    );
    assert_eq!(
        res("file:///public/secret.txt"),
        Err(CapabilityError::Denied {
            kind: "resource",
            name: "file:///public/secret.txt".into(),
            caveat: 3
        })
    );
    // A URI the upstream could resolve to another is refused before any caveat: the allow
    // would match it as written, and the deny would not.
    for dodge in [
        "file:///public/x/../secret.txt",
        "file:///public/%2e%2e/%2e%2e/etc/passwd",
        "FILE:///public/secret.txt",
    ] {
        assert!(
            matches!(res(dodge), Err(CapabilityError::AmbiguousUri { .. })),
            "{dodge}: {:?}",
            res(dodge)
        );
    }
    assert_eq!(prompt("summarize"), Ok(()));
    assert_eq!(prompt("greet_user"), Ok(()));
    assert_eq!(
        prompt("greet_admin"),
        Err(CapabilityError::Denied {
            kind: "prompt",
            name: "greet_admin".into(),
            caveat: 5
        })
    );
    assert!(matches!(
        prompt("exfiltrate"),
        Err(CapabilityError::NotAllowed { kind: "prompt", .. })
    ));
    // The tool caveats still govern tools, and no other kind's caveat touches them; a
    // resource named like an allowed tool is still a resource.
    assert_eq!(g.authorize(&CallContext::tool("read_invoice")), Ok(()));
    assert!(!g.allows(Kind::Resource, "read_invoice"));
    assert!(g.allows(Kind::Resource, "note://x") && !g.allows(Kind::Prompt, "note://x"));
    // Empty lists allow nothing; a field the type does not take is refused.
    let none = grant(&attenuate(&m.token, vec![Caveat::bare("prompt_allow")]));
    assert!(!none.allows(Kind::Prompt, "summarize"));
    let mut wrong = Caveat::scoped("resource_deny", ["x"]);
    wrong.servers = vec!["s".into()];
    assert!(matches!(
        auth(&attenuate(&m.token, vec![wrong])),
        Err(CapabilityError::MalformedCaveat {
            kind: "resource_deny",
            ..
        })
    ));
    let bad_glob = attenuate(&m.token, vec![Caveat::scoped("prompt_deny", ["[a"])]);
    assert!(matches!(
        auth(&bad_glob),
        Err(CapabilityError::MalformedCaveat {
            kind: "prompt_deny",
            ..
        })
    ));
}

/// A completion of a resource template's argument names what the template's expansions
/// reach: a deny caveat refuses the template when any expansion could be denied, and leaves
/// templates whose expansions it cannot reach alone.
#[test]
fn a_resource_deny_covers_every_expansion_of_a_template() {
    let m = mint_ok(&req("bot"));
    let t = attenuate(
        &m.token,
        vec![Caveat::scoped(
            "resource_deny",
            ["file:///secret/*", "db://?/admin"],
        )],
    );
    let g = grant(&t);
    let template = |uri| {
        g.authorize(&CallContext {
            template: true,
            ..CallContext::of(Kind::Resource, uri)
        })
    };
    for denied in [
        "file:///{path}",
        "file:///secret/{name}",
        "file:///{+path}",
        "{uri}",
        "db://{shard}/admin",
    ] {
        assert!(
            matches!(template(denied), Err(CapabilityError::Denied { .. })),
            "{denied}"
        );
    }
    for allowed in ["file:///public/{name}", "note://{id}", "db://ab{x}"] {
        assert_eq!(template(allowed), Ok(()), "{allowed}");
    }
    // The same text as a plain URI is only itself.
    assert_eq!(
        g.authorize(&CallContext::of(Kind::Resource, "file:///{path}")),
        Ok(())
    );
}

#[test]
fn mcp_allow_needs_a_matching_server() {
    let m = mint_ok(&MintRequest {
        servers: vec!["erp-*".into(), "crm".into()],
        ..req("bot")
    });
    let g = grant(&m.token);
    let call = |server| CallContext {
        server,
        ..CallContext::tool("x")
    };
    assert_eq!(g.authorize(&call(Some("erp-eu"))), Ok(()));
    assert_eq!(g.authorize(&call(Some("crm"))), Ok(()));
    assert_eq!(
        g.authorize(&call(Some("hr"))),
        Err(CapabilityError::ServerNotAllowed {
            server: Some("hr".into()),
            caveat: 1
        })
    );
    assert_eq!(
        g.authorize(&call(None)),
        Err(CapabilityError::ServerNotAllowed {
            server: None,
            caveat: 1
        })
    );
    assert!(
        g.allows_tool("x"),
        "tools/list filtering looks at tool caveats only"
    );
}

#[test]
fn reaches_reads_only_the_server_and_callee_caveats() {
    let m = mint_ok(&MintRequest {
        servers: vec!["git*".into()],
        callees: vec!["github".into(), "db".into()],
        tools: vec!["none-of-these".into()],
        ..req("bot")
    });
    let g = grant(&m.token);
    assert!(g.reaches("github"), "allowed by both, whatever the tools");
    assert!(!g.reaches("db"), "mcp_allow refuses it");
    assert!(!g.reaches("gitlab"), "callee_allow refuses it");
    let open = grant(&mint_ok(&req("bot")).token);
    assert!(
        open.reaches("anything"),
        "no server caveats: every upstream"
    );
}

#[test]
fn callee_allow_by_agent_glob_or_zone() {
    let m = mint_ok(&MintRequest {
        callees: vec!["helper-*".into()],
        ..req("bot")
    });
    // A token attenuated offline may carry zones, which mint refuses.
    let t = attenuate(
        &m.token,
        vec![Caveat {
            callees: vec!["helper-*".into()],
            callee_zones: vec!["ops".into()],
            ..Caveat::bare("callee_allow")
        }],
    );
    let g = grant(&t);
    let call = |callee| CallContext {
        callee,
        ..CallContext::tool("x")
    };
    assert_eq!(
        g.authorize(&call(Some(("helper-7", Some("finance"))))),
        Ok(())
    );
    assert_eq!(g.authorize(&call(Some(("helper-7", None)))), Ok(()));
    let zone_only = grant(&attenuate(
        &m.token,
        vec![Caveat {
            callee_zones: vec!["ops".into()],
            ..Caveat::bare("callee_allow")
        }],
    ));
    assert_eq!(
        zone_only.authorize(&call(Some(("helper-7", Some("ops"))))),
        Ok(())
    );
    assert_eq!(
        zone_only.authorize(&call(Some(("helper-7", None)))),
        Err(CapabilityError::CalleeNotAllowed {
            callee: Some("helper-7".into()),
            caveat: 2
        }),
        "an unknown zone matches no callee_zones entry"
    );
    assert_eq!(
        g.authorize(&call(Some(("stranger", Some("finance"))))),
        Err(CapabilityError::CalleeNotAllowed {
            callee: Some("stranger".into()),
            caveat: 1
        })
    );
    assert_eq!(
        g.authorize(&call(None)),
        Err(CapabilityError::CalleeNotAllowed {
            callee: None,
            caveat: 1
        })
    );
    // An empty zone in a caveat never matches an unknown zone.
    let empty_zone = grant(&attenuate(
        &m.token,
        vec![Caveat {
            callee_zones: vec![String::new()],
            ..Caveat::bare("callee_allow")
        }],
    ));
    assert!(
        empty_zone
            .authorize(&call(Some(("helper-7", None))))
            .is_err()
    );
    let empty = grant(&attenuate(&m.token, vec![Caveat::bare("callee_allow")]));
    assert!(
        empty
            .authorize(&call(Some(("helper-7", Some("ops")))))
            .is_err()
    );
}

#[test]
fn risk_max_is_a_ceiling_and_no_score_is_refused_as_not_evaluated() {
    let m = mint_ok(&req("bot"));
    let t = attenuate(
        &m.token,
        vec![Caveat {
            risk_max: 60,
            ..Caveat::bare("risk_max")
        }],
    );
    let g = grant(&t);
    let call = |risk| CallContext {
        risk,
        ..CallContext::tool("x")
    };
    assert_eq!(g.authorize(&call(Some(60))), Ok(()));
    assert_eq!(g.authorize(&call(Some(0))), Ok(()));
    assert_eq!(
        g.authorize(&call(Some(61))),
        Err(CapabilityError::RiskTooHigh {
            risk: 61,
            max: 60,
            caveat: 1
        })
    );
    // The gateway has no risk score: refused, saying why, not "risk 100 exceeds 60".
    let e = g.authorize(&call(None));
    assert_eq!(e, Err(CapabilityError::RiskNotEvaluated { caveat: 1 }));
    let reason = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        reason.contains("does not evaluate risk_max") && !reason.contains("100"),
        "{reason}"
    );
    let child = grant(&attenuate(
        &t,
        vec![
            Caveat {
                risk_max: 90,
                ..Caveat::bare("risk_max")
            },
            Caveat::bare("risk_max"),
        ],
    ));
    assert_eq!(
        child.risk_max,
        Some(0),
        "minimum along the chain; a bare risk_max is a ceiling of 0"
    );
    assert_eq!(
        child.authorize(&call(Some(1))),
        Err(CapabilityError::RiskTooHigh {
            risk: 1,
            max: 0,
            caveat: 3
        })
    );
    // Even a ceiling of 100 cannot be evaluated without a score.
    let unlimited = grant(&attenuate(
        &m.token,
        vec![Caveat {
            risk_max: 100,
            ..Caveat::bare("risk_max")
        }],
    ));
    assert!(unlimited.authorize(&call(None)).is_err());
    assert_eq!(unlimited.authorize(&call(Some(100))), Ok(()));
}

#[test]
fn stateful_limits_are_the_minimum_along_the_chain() {
    let m = mint_ok(&MintRequest {
        max_calls: Some(10),
        rate_per_min: Some(5),
        max_cents: Some(100),
        step_up_at: Some(500),
        ..req("bot")
    });
    let t = attenuate(
        &m.token,
        vec![
            Caveat::max_calls(3),
            Caveat::max_calls(7),
            Caveat {
                rate_per_min: 9,
                ..Caveat::bare("rate_limit")
            },
            Caveat {
                max_cents: 40,
                ..Caveat::bare("max_cost")
            },
            Caveat {
                step_up_at: 400,
                ..Caveat::bare("step_up")
            },
        ],
    );
    let g = grant(&t);
    assert_eq!(
        (g.max_calls, g.rate_per_min, g.max_cents, g.step_up_at),
        (Some(3), Some(5), Some(40), Some(400))
    );
    assert_eq!(
        g.authorize(&CallContext::tool("x")),
        Ok(()),
        "not enforced here"
    );
    // A bare max_calls (as the Python SDK writes for max_calls=0) means zero calls.
    assert_eq!(
        grant(&attenuate(&m.token, vec![Caveat::bare("max_calls")])).max_calls,
        Some(0)
    );
}

#[test]
fn agent_lock_binds_the_subject_and_the_request() {
    let m = mint_ok(&req("bot"));
    let g = grant(&m.token);
    assert_eq!(
        g.authorize(&CallContext {
            agent: Some("bot"),
            ..CallContext::tool("x")
        }),
        Ok(())
    );
    assert_eq!(
        g.authorize(&CallContext {
            agent: Some("other"),
            ..CallContext::tool("x")
        }),
        Err(CapabilityError::AgentMismatch {
            agent: "other".into()
        })
    );
    // A holder cannot attenuate the token into another agent's: the lock must equal `sub`.
    let t = attenuate(&m.token, vec![Caveat::agent_lock("other")]);
    assert_eq!(
        auth(&t).err(),
        Some(CapabilityError::AgentLockMismatch { caveat: 1 })
    );
    let t = attenuate(&m.token, vec![Caveat::bare("agent_lock")]);
    assert_eq!(
        auth(&t).err(),
        Some(CapabilityError::AgentLockMismatch { caveat: 1 })
    );
}

#[test]
fn unknown_and_malformed_caveats_are_denied() {
    let m = mint_ok(&req("bot"));
    let t = attenuate(&m.token, vec![Caveat::bare("discharge")]);
    assert_eq!(
        auth(&t).err(),
        Some(CapabilityError::UnknownCaveat {
            caveat: 1,
            kind: "discharge".into()
        })
    );
    let bad = |c: Caveat| auth(&attenuate(&m.token, vec![c])).err();
    let wrong_field = Caveat {
        max_calls: 5,
        ..Caveat::tool_allow(["a"])
    };
    assert!(matches!(
        bad(wrong_field),
        Some(CapabilityError::MalformedCaveat {
            caveat: 1,
            kind: "tool_allow",
            ..
        })
    ));
    assert!(matches!(
        bad(Caveat::max_calls(-1)),
        Some(CapabilityError::MalformedCaveat {
            kind: "max_calls",
            ..
        })
    ));
    assert!(matches!(
        bad(Caveat::tool_allow(["[a"])),
        Some(CapabilityError::MalformedCaveat {
            kind: "tool_allow",
            ..
        })
    ));
    assert!(matches!(
        bad(Caveat::bare("exp")),
        Some(CapabilityError::MalformedCaveat { kind: "exp", .. })
    ));
    let neg_risk = Caveat {
        risk_max: -1,
        ..Caveat::bare("risk_max")
    };
    assert!(matches!(
        bad(neg_risk),
        Some(CapabilityError::MalformedCaveat {
            kind: "risk_max",
            ..
        })
    ));
}

// ---- time --------------------------------------------------------------------------------------

#[test]
fn exp_boundary_has_no_leeway() {
    let m = mint_ok(&MintRequest {
        ttl_seconds: Some(100),
        ..req("bot")
    });
    let v = Verifier::new(key(), 300);
    assert!(v.authenticate(&m.token, NOW + 99, &fresh()).is_ok());
    assert_eq!(
        v.authenticate(&m.token, NOW + 100, &fresh()).err(),
        Some(CapabilityError::Expired { caveat: 1 })
    );
    // A child may only shorten the lifetime.
    let child = attenuate(
        &m.token,
        vec![Caveat::exp(NOW + 10), Caveat::exp(NOW + 1000)],
    );
    let g = v
        .authenticate(&child, NOW, &fresh())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.expires_at, Some(NOW + 10));
    assert_eq!(
        v.authenticate(&child, NOW + 10, &fresh()).err(),
        Some(CapabilityError::Expired { caveat: 2 })
    );
    // A grant checked again later (a call that waited) expires as its token would, naming the
    // same caveat, and is refused once its token is revoked.
    assert_eq!(g.still_valid(NOW + 9, &fresh()), Ok(()));
    assert_eq!(
        g.still_valid(NOW + 10, &fresh()),
        Err(CapabilityError::Expired { caveat: 2 })
    );
    let set = fresh();
    set.extend([g.root_jti.clone()]);
    assert_eq!(g.still_valid(NOW, &set), Err(CapabilityError::Revoked));
}

#[test]
fn nbf_boundary_with_leeway() {
    let m = mint_ok(&MintRequest {
        nbf: Some((NOW + 100) as u64),
        ..req("bot")
    });
    let v = Verifier::new(key(), 30);
    assert_eq!(
        v.authenticate(&m.token, NOW + 69, &fresh()).err(),
        Some(CapabilityError::NotYetValid)
    );
    assert!(v.authenticate(&m.token, NOW + 70, &fresh()).is_ok());
    let strict = Verifier::new(key(), 0);
    assert_eq!(
        strict.authenticate(&m.token, NOW + 99, &fresh()).err(),
        Some(CapabilityError::NotYetValid)
    );
    assert!(strict.authenticate(&m.token, NOW + 100, &fresh()).is_ok());
    assert_eq!(Verifier::new(key(), -5).leeway_secs(), 0);
    assert_eq!(
        Verifier::new(key(), 1_000_000).leeway_secs(),
        MAX_LEEWAY_SECS
    );
}

// ---- revocation --------------------------------------------------------------------------------

#[test]
fn revoking_jti_or_root_rejects_the_tree() {
    let m = mint_ok(&req("bot"));
    let child = attenuate(&m.token, vec![Caveat::tool_allow(["a"])]);
    let set = RevocationSet::always_fresh();
    assert!(verifier().authenticate(&child, NOW, &set).is_ok());
    set.extend([m.root_jti.clone()]);
    assert_eq!(
        verifier().authenticate(&m.token, NOW, &set).err(),
        Some(CapabilityError::Revoked)
    );
    assert_eq!(
        verifier().authenticate(&child, NOW, &set).err(),
        Some(CapabilityError::Revoked)
    );
    // A token whose own jti differs from its root is caught by either id.
    let mut t = decode(&mint_ok(&req("bot")).token);
    t.jti = "child-hop".into();
    t.sign(&key());
    let set = RevocationSet::always_fresh();
    set.extend(["child-hop"]);
    assert_eq!(
        verifier().authenticate(&t.encode(), NOW, &set).err(),
        Some(CapabilityError::Revoked)
    );
}

#[test]
fn stale_revocation_set_fails_closed() {
    let m = mint_ok(&req("bot"));
    let set = RevocationSet::new(std::time::Duration::from_secs(60));
    assert_eq!(
        verifier().authenticate(&m.token, NOW, &set).err(),
        Some(CapabilityError::RevocationStale)
    );
    set.mark_synced();
    assert!(verifier().authenticate(&m.token, NOW, &set).is_ok());
}

// ---- bounded matching ---------------------------------------------------------------------------

#[test]
fn a_holders_wildcards_are_bounded() {
    let m = mint_ok(&req("bot"));
    // What backtracks worst: `*a*a*…*b` against a name of `a`s.
    let costly = format!("{}b", "*a".repeat(250));
    assert_eq!(costly.len(), 501);
    let child = attenuate(
        &m.token,
        vec![Caveat::scoped("tool_allow", [costly.clone()])],
    );
    assert!(auth(&child).is_ok(), "one such pattern is within the bound");
    let child = attenuate(
        &m.token,
        vec![Caveat::scoped(
            "tool_deny",
            [costly.clone(), costly.clone(), costly],
        )],
    );
    assert_eq!(
        auth(&child).err(),
        Some(CapabilityError::TooManyWildcards {
            bytes: 1503,
            max: 1024
        })
    );
    // Literal names cost one pass and are not counted.
    let names: Vec<String> = (0..40).map(|i| format!("tool_{i:040}")).collect();
    let child = attenuate(&m.token, vec![Caveat::scoped("tool_allow", names)]);
    assert!(auth(&child).is_ok());
    // No pattern longer than a name may be.
    let child = attenuate(
        &m.token,
        vec![Caveat::scoped("tool_allow", ["x".repeat(513)])],
    );
    assert!(matches!(
        auth(&child).err(),
        Some(CapabilityError::MalformedCaveat { .. })
    ));
    // The mint refuses what verification would.
    let many: Vec<String> = (0..5).map(|i| format!("{i}{}", "*x".repeat(120))).collect();
    assert!(matches!(
        mint(
            &key(),
            &MintRequest {
                tools: many,
                ..req("bot")
            },
            NOW
        ),
        Err(MintError::InvalidPattern { .. })
    ));
}
