//! Interop with the real IntentGate Python SDK (`pip install intentgate==0.3.0`): tokens minted
//! here are attenuated by `intentgate.capability.attenuate` and must verify here, with the
//! narrowed caveats enforced; a child tampered with on the Python side must be rejected.
//!
//! This test must never skip: without the SDK it fails and says how to install it.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use intentgate::capability::{
    CallContext, CapabilityError, Caveat, DEFAULT_LEEWAY_SECS, MasterKey, MintRequest,
    RevocationSet, Token, Verifier, mint,
};
use serde_json::Value;

/// Attenuates `token` with the SDK and prints the children (and tampered variants) as JSON.
const SCRIPT: &str = r#"
import base64, json, sys
try:
    from intentgate.capability import attenuate, decode_token
except ImportError as exc:
    print("IMPORT-ERROR: %s" % exc)
    sys.exit(3)

def enc(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

parent = sys.argv[1]
child = attenuate(parent, add_tools=["read_invoice", "list_vendors"], deny_tools=["list_*"],
                  max_calls=3, expires_in_seconds=60)
single = attenuate(parent, add_tools=["read_invoice", "list_vendors"])
grandchild = attenuate(child, max_calls=1)

widened = decode_token(child)
widened["cav"][4]["tools"].append("send_email")
dropped = decode_token(child)
dropped["cav"].pop()
raised = decode_token(child)
raised["cav"][6]["max_calls"] = 1000
retenant = decode_token(child)
retenant["tenant"] = "globex"

print(json.dumps({
    "parent_fields": decode_token(parent),
    "child": child,
    "single": single,
    "grandchild": grandchild,
    "widened": enc(widened),
    "dropped": enc(dropped),
    "raised": enc(raised),
    "retenant": enc(retenant),
}))
"#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn run_sdk(token: &str) -> Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(token)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): install Python 3 and run `pip install intentgate==0.3.0`"
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.starts_with("IMPORT-ERROR") {
        panic!(
            "the intentgate Python SDK is not importable ({}): run `pip install intentgate==0.3.0`",
            stdout.trim()
        );
    }
    assert!(
        out.status.success(),
        "SDK script failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("SDK output is not JSON ({e}): {stdout}"))
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("SDK output lacks {name}"))
}

#[test]
fn python_sdk_attenuation_interop() {
    let key = MasterKey::generate().unwrap_or_else(|e| panic!("{e}"));
    let verifier = Verifier::new(key.clone(), DEFAULT_LEEWAY_SECS);
    let revocations = RevocationSet::always_fresh();
    let start = now();
    let minted = mint(
        &key,
        &MintRequest {
            subject: "agent-trade-bot".into(),
            tenant: Some("acme".into()),
            ttl_seconds: Some(3600),
            tools: vec!["read_*".into(), "list_vendors".into(), "send_email".into()],
            max_calls: Some(100),
            ..MintRequest::default()
        },
        start,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sdk = run_sdk(&minted.token);

    // The SDK reads our token as we wrote it.
    let parent = &sdk["parent_fields"];
    assert_eq!(parent["jti"], minted.jti.as_str());
    assert_eq!(parent["tenant"], "acme");
    assert_eq!(parent["cav"][0]["t"], "agent_lock");

    // The SDK's child verifies here, keeps the ids, and its caveats narrow the grant.
    let child = field(&sdk, "child");
    let now = now();
    let grant = verifier
        .authenticate(child, now, &revocations)
        .unwrap_or_else(|e| panic!("SDK child refused: {e}"));
    assert_eq!(
        (grant.jti.as_str(), grant.root_jti.as_str()),
        (minted.jti.as_str(), minted.jti.as_str())
    );
    assert_eq!(grant.caveat_count, 4 + 4);
    assert_eq!(grant.max_calls, Some(3));
    let exp = grant.expires_at.unwrap_or(i64::MAX);
    assert!(
        (start + 59..=now + 60).contains(&exp),
        "child exp {exp} not within 60 s"
    );
    assert_eq!(grant.authorize(&CallContext::tool("read_invoice")), Ok(()));
    assert_eq!(
        grant.authorize(&CallContext::tool("send_email")),
        Err(CapabilityError::ToolNotAllowed {
            tool: "send_email".into(),
            caveat: 4
        })
    );
    assert_eq!(
        grant.authorize(&CallContext::tool("list_vendors")),
        Err(CapabilityError::ToolDenied {
            tool: "list_vendors".into(),
            caveat: 5
        })
    );
    assert_eq!(
        grant.authorize(&CallContext::tool("read_other")),
        Err(CapabilityError::ToolNotAllowed {
            tool: "read_other".into(),
            caveat: 4
        })
    );
    assert!(grant.allows_tool("read_invoice") && !grant.allows_tool("send_email"));
    // ... while the parent still allows what the child gave up.
    let parent_grant = verifier
        .authenticate(&minted.token, now, &revocations)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parent_grant.authorize(&CallContext::tool("send_email")),
        Ok(())
    );

    // A grandchild narrows further; the child expires for real.
    let grandchild = field(&sdk, "grandchild");
    let g2 = verifier
        .authenticate(grandchild, now, &revocations)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g2.max_calls, Some(1));
    assert_eq!(
        verifier.authenticate(child, exp, &revocations).err(),
        Some(CapabilityError::Expired { caveat: 7 })
    );

    // Byte-for-byte agreement on one caveat step: our attenuation gives the SDK's signature.
    let ours = Token::decode(&minted.token)
        .and_then(|t| t.attenuate(Caveat::tool_allow(["read_invoice", "list_vendors"])))
        .unwrap_or_else(|e| panic!("{e}"));
    let theirs = Token::decode(field(&sdk, "single")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ours.sig, theirs.sig);
    assert_eq!(ours, theirs);

    // Tampering on the Python side is caught.
    for name in ["widened", "dropped", "raised", "retenant"] {
        assert_eq!(
            verifier
                .authenticate(field(&sdk, name), now, &revocations)
                .err(),
            Some(CapabilityError::BadSignature),
            "{name}"
        );
    }

    // Revoking the root revokes the SDK's children.
    revocations.extend([minted.root_jti.clone()]);
    assert_eq!(
        verifier.authenticate(child, now, &revocations).err(),
        Some(CapabilityError::Revoked)
    );
    assert_eq!(
        verifier.authenticate(grandchild, now, &revocations).err(),
        Some(CapabilityError::Revoked)
    );
}
