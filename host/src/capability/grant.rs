//! What an authenticated token permits: identity, effective limits, and the per-call checks
//! (`tool_allow`, `tool_deny`, `resource_allow`, `resource_deny`, `prompt_allow`, `prompt_deny`,
//! `mcp_allow`, `callee_allow`, `risk_max`, the requesting agent).
//!
//! A call has a [`Kind`]: a tool (by name), a resource (by URI) or a prompt (by name). Each
//! allow/deny pair restricts only its own kind, so a token without `resource_*` caveats reaches
//! every resource and one without `prompt_*` caveats every prompt, as before those caveats
//! existed; `mcp_allow`, `callee_allow`, `risk_max` and the agent apply to every kind.
//!
//! A [`Grant`] can only be built by `Verifier::authenticate`, so holding one means the token's
//! signature, time window and revocation status were checked. Stateful limits (`max_calls`,
//! `rate_limit`, `max_cost`, `step_up`) are only surfaced here for the budget and policy stages.
//! This module must never let a missing fact (no server, no callee, no risk score) allow a call
//! that a caveat restricts.
//!
//! The callee of a call is the upstream server the gateway forwards it to: its configured name
//! (`INTENTGATE_UPSTREAM_NAME`, or its name in `INTENTGATE_UPSTREAMS`) is the callee agent that
//! `callee_allow` globs match, and the server that `mcp_allow` globs match. The gateway
//! knows no zone for its upstream, so a caveat's `callee_zones` match nothing (mint refuses
//! them). No risk score is computed either: a `risk_max` caveat cannot be evaluated and is
//! refused with that reason (mint refuses it too), never read as "risk 100".

use super::MAX_NAME_BYTES;
use super::error::{CapabilityError, echo};
use super::glob::{Glob, any_matches};
use super::token::Token;

/// A per-call restriction from one caveat, kept in chain order.
#[derive(Debug, Clone)]
pub(crate) enum Restriction {
    ToolAllow {
        caveat: usize,
        globs: Vec<Glob>,
    },
    ToolDeny {
        caveat: usize,
        globs: Vec<Glob>,
    },
    /// `resource_allow` / `prompt_allow`: the name of a call of `kind` must match a glob.
    KindAllow {
        kind: Kind,
        caveat: usize,
        globs: Vec<Glob>,
    },
    /// `resource_deny` / `prompt_deny`: the name of a call of `kind` must match no glob.
    KindDeny {
        kind: Kind,
        caveat: usize,
        globs: Vec<Glob>,
    },
    McpAllow {
        caveat: usize,
        globs: Vec<Glob>,
    },
    /// Allowed if the callee agent matches a glob of `agents` OR its zone is in `zones`
    /// (as the original's `CanCall`); both empty allows nothing.
    CalleeAllow {
        caveat: usize,
        agents: Vec<Glob>,
        zones: Vec<String>,
    },
    RiskMax {
        caveat: usize,
        max: i64,
    },
}

/// What a call reaches, for the caveats that restrict one kind of target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    /// A tool, by name (`tool_allow`, `tool_deny`).
    #[default]
    Tool,
    /// A resource, by URI (`resource_allow`, `resource_deny`).
    Resource,
    /// A prompt, by name (`prompt_allow`, `prompt_deny`).
    Prompt,
}

impl Kind {
    /// The kind as errors, audit events and policies name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Resource => "resource",
            Kind::Prompt => "prompt",
        }
    }
}

/// The facts about one call that the per-call caveats need.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContext<'a> {
    /// What the call reaches: a tool, a resource or a prompt.
    pub kind: Kind,
    /// The tool's name, the resource's URI or the prompt's name.
    pub tool: &'a str,
    /// With several upstreams, `tool` as its upstream knows it (without the namespace): the
    /// deny caveats refuse a call when either name matches, so a `tool_deny ["delete_*"]`
    /// minted before a second upstream was configured still refuses `gh__delete_repo`. The
    /// allow caveats match `tool` only (they fail closed on a namespaced name).
    pub own_name: Option<&'a str>,
    /// The agent the request claims to act for, if it names one; must be the token's subject.
    pub agent: Option<&'a str>,
    /// The upstream MCP server the call goes to; `None` fails every `mcp_allow` caveat.
    pub server: Option<&'a str>,
    /// `(agent, zone)` of the callee: the upstream server's name, and its zone when one is
    /// known. `None` fails every `callee_allow` caveat; an unknown zone matches no
    /// `callee_zones` entry.
    pub callee: Option<(&'a str, Option<&'a str>)>,
    /// The caller's risk score 0-100. The gateway computes none (`None`): a `risk_max` caveat
    /// then fails with [`CapabilityError::RiskNotEvaluated`].
    pub risk: Option<u8>,
    /// `tool` is a URI template (a completion of a resource template's argument), not one
    /// name: a `*_deny` caveat refuses it when any of its expansions could be denied, since
    /// the completion's values name what those expansions reach.
    pub template: bool,
}

impl<'a> CallContext<'a> {
    /// A call to `tool` with no other facts known.
    pub fn tool(tool: &'a str) -> CallContext<'a> {
        CallContext {
            tool,
            ..CallContext::default()
        }
    }

    /// A call reaching `name` of `kind` with no other facts known.
    pub fn of(kind: Kind, name: &'a str) -> CallContext<'a> {
        CallContext {
            kind,
            tool: name,
            ..CallContext::default()
        }
    }
}

/// An authenticated token: who it is, its effective limits, and its per-call restrictions.
///
/// Only `Verifier::authenticate` builds one (the restriction list is private). The public
/// fields are facts for the later stages; treat them as read-only.
#[derive(Debug, Clone)]
pub struct Grant {
    pub jti: String,
    pub root_jti: String,
    pub tenant: String,
    pub zone: String,
    /// The agent the token is bound to (`sub`, equal to every `agent_lock`).
    pub subject: String,
    pub issued_at: i64,
    pub caveat_count: usize,
    /// The earliest `exp` along the chain.
    pub expires_at: Option<i64>,
    /// The smallest `max_calls` along the chain (enforced by the budget stage).
    pub max_calls: Option<u64>,
    /// The smallest `rate_per_min` along the chain (enforced by the budget stage).
    pub rate_per_min: Option<u64>,
    /// The smallest `max_cents` along the chain (enforced by the budget stage).
    pub max_cents: Option<u64>,
    /// The lowest `risk_max` ceiling along the chain, capped at 100 (enforced by `authorize`).
    pub risk_max: Option<u8>,
    /// The oldest `step_up_at` along the chain (for the policy input; 0 means none recorded).
    pub step_up_at: Option<i64>,
    /// SHA-256 of the token's signature: one value per token, where `jti` is shared by a token
    /// and every token attenuated from it (what only the presenting token may touch is keyed
    /// by this). A digest, so it reveals nothing of the signature.
    pub token_digest: [u8; 32],
    /// The `exp` caveat that set `expires_at`.
    pub(crate) expiry_caveat: usize,
    restrictions: Vec<Restriction>,
}

impl Grant {
    pub(crate) fn new(t: &Token) -> Grant {
        Grant {
            jti: t.jti.clone(),
            root_jti: t.root_jti.clone(),
            tenant: t.tenant.clone(),
            zone: t.zone.clone(),
            subject: t.sub.clone(),
            issued_at: t.iat,
            caveat_count: t.cav.len(),
            expires_at: None,
            max_calls: None,
            rate_per_min: None,
            max_cents: None,
            risk_max: None,
            step_up_at: None,
            token_digest: {
                use sha2::Digest;
                sha2::Sha256::digest(t.sig.as_bytes()).into()
            },
            expiry_caveat: 0,
            restrictions: Vec::new(),
        }
    }

    /// The token's own key, as text: [`Self::token_digest`] in hex (what an upstream's request
    /// during a call, and its reply, are tied to).
    pub fn token_key(&self) -> String {
        use std::fmt::Write;
        self.token_digest
            .iter()
            .fold(String::with_capacity(64), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }

    /// Whether the token is still good at `now_unix`, for a call decided some time after its
    /// request authenticated it (a call held for an approval, a long poll, an upstream's
    /// request during a long call): not expired since, nor revoked, nor with a stale
    /// revocation list.
    pub fn still_valid(
        &self,
        now_unix: i64,
        revocations: &super::RevocationSet,
    ) -> Result<(), CapabilityError> {
        if self.expires_at.is_some_and(|exp| now_unix >= exp) {
            return Err(CapabilityError::Expired {
                caveat: self.expiry_caveat,
            });
        }
        revocations.check(&self.jti, &self.root_jti)
    }

    pub(crate) fn push(&mut self, r: Restriction) {
        self.restrictions.push(r);
    }

    /// The bytes of the grant's patterns with a `*` (see [`Glob::wildcard_bytes`]).
    pub(crate) fn wildcard_bytes(&self) -> usize {
        let sum = |globs: &[Glob]| globs.iter().map(Glob::wildcard_bytes).sum::<usize>();
        self.restrictions
            .iter()
            .map(|r| match r {
                Restriction::ToolAllow { globs, .. }
                | Restriction::ToolDeny { globs, .. }
                | Restriction::KindAllow { globs, .. }
                | Restriction::KindDeny { globs, .. }
                | Restriction::McpAllow { globs, .. } => sum(globs),
                Restriction::CalleeAllow { agents, .. } => sum(agents),
                Restriction::RiskMax { .. } => 0,
            })
            .sum()
    }

    /// Checks one call against the token's per-call caveats, in chain order; the first failing
    /// caveat is reported.
    pub fn authorize(&self, ctx: &CallContext<'_>) -> Result<(), CapabilityError> {
        check_len(ctx.kind.as_str(), Some(ctx.tool))?;
        check_len("agent", ctx.agent)?;
        check_len("server", ctx.server)?;
        check_len("callee", ctx.callee.map(|(a, _)| a))?;
        check_len("callee zone", ctx.callee.and_then(|(_, z)| z))?;
        if let Some(agent) = ctx.agent
            && agent != self.subject
        {
            return Err(CapabilityError::AgentMismatch { agent: echo(agent) });
        }
        // Before any caveat: the caveats and the policy decide on the URI as written, and the
        // upstream must not be able to read it as another.
        if ctx.kind == Kind::Resource
            && let Some(why) = super::uri::ambiguity(ctx.tool)
        {
            return Err(CapabilityError::AmbiguousUri {
                uri: echo(ctx.tool),
                why,
            });
        }
        for r in &self.restrictions {
            check(r, ctx)?;
        }
        Ok(())
    }

    /// Whether the tool caveats alone (`tool_allow`, `tool_deny`) permit `tool`: used to filter
    /// `tools/list` to the token's scope.
    pub fn allows_tool(&self, tool: &str) -> bool {
        self.allows(Kind::Tool, tool)
    }

    /// Whether the caveats of `kind` alone (`tool_*`, `resource_*` or `prompt_*`) permit
    /// `name`: used to filter lists to the token's scope.
    pub fn allows(&self, kind: Kind, name: &str) -> bool {
        let ctx = CallContext::of(kind, name);
        name.len() <= MAX_NAME_BYTES
            && self.restrictions.iter().all(|r| match r {
                Restriction::ToolAllow { .. }
                | Restriction::ToolDeny { .. }
                | Restriction::KindAllow { .. }
                | Restriction::KindDeny { .. } => check(r, &ctx).is_ok(),
                _ => true,
            })
    }
}

impl Grant {
    /// Whether the server caveats alone (`mcp_allow`, `callee_allow`) let calls reach the
    /// upstream named `server`: used to leave out of lists what that upstream offers.
    pub fn reaches(&self, server: &str) -> bool {
        let ctx = CallContext {
            server: Some(server),
            callee: Some((server, None)),
            ..CallContext::default()
        };
        server.len() <= MAX_NAME_BYTES
            && self.restrictions.iter().all(|r| match r {
                Restriction::McpAllow { .. } | Restriction::CalleeAllow { .. } => {
                    check(r, &ctx).is_ok()
                }
                _ => true,
            })
    }
}

fn check_len(what: &'static str, name: Option<&str>) -> Result<(), CapabilityError> {
    match name {
        Some(n) if n.len() > MAX_NAME_BYTES => Err(CapabilityError::NameTooLong { what }),
        _ => Ok(()),
    }
}

/// Whether a deny caveat's `globs` refuse the call: its name, or for a URI template any name
/// its expansions could take (only the literal part before its first expression is known).
fn denies(globs: &[Glob], ctx: &CallContext<'_>) -> bool {
    let one = |name: &str| match name.split_once('{') {
        Some((prefix, _)) if ctx.template => globs.iter().any(|g| g.may_match_with_prefix(prefix)),
        _ => any_matches(globs, name),
    };
    one(ctx.tool) || ctx.own_name.is_some_and(one)
}

fn check(r: &Restriction, ctx: &CallContext<'_>) -> Result<(), CapabilityError> {
    let is_tool = ctx.kind == Kind::Tool;
    match r {
        Restriction::ToolAllow { caveat, globs } if is_tool && !any_matches(globs, ctx.tool) => {
            Err(CapabilityError::ToolNotAllowed {
                tool: echo(ctx.tool),
                caveat: *caveat,
            })
        }
        Restriction::ToolDeny { caveat, globs } if is_tool && denies(globs, ctx) => {
            Err(CapabilityError::ToolDenied {
                tool: echo(ctx.tool),
                caveat: *caveat,
            })
        }
        Restriction::KindAllow {
            kind,
            caveat,
            globs,
        } if *kind == ctx.kind && !any_matches(globs, ctx.tool) => {
            Err(CapabilityError::NotAllowed {
                kind: kind.as_str(),
                name: echo(ctx.tool),
                caveat: *caveat,
            })
        }
        Restriction::KindDeny {
            kind,
            caveat,
            globs,
        } if *kind == ctx.kind && denies(globs, ctx) => Err(CapabilityError::Denied {
            kind: kind.as_str(),
            name: echo(ctx.tool),
            caveat: *caveat,
        }),
        Restriction::McpAllow { caveat, globs } => match ctx.server {
            Some(s) if any_matches(globs, s) => Ok(()),
            server => Err(CapabilityError::ServerNotAllowed {
                server: server.map(echo),
                caveat: *caveat,
            }),
        },
        Restriction::CalleeAllow {
            caveat,
            agents,
            zones,
        } => match ctx.callee {
            Some((a, z))
                if any_matches(agents, a) || z.is_some_and(|z| zones.iter().any(|x| x == z)) =>
            {
                Ok(())
            }
            callee => Err(CapabilityError::CalleeNotAllowed {
                callee: callee.map(|(a, _)| echo(a)),
                caveat: *caveat,
            }),
        },
        Restriction::RiskMax { caveat, max } => {
            // No score is not a score of 100: say that the caveat cannot be evaluated, and
            // refuse (fail closed).
            let Some(risk) = ctx.risk else {
                return Err(CapabilityError::RiskNotEvaluated { caveat: *caveat });
            };
            if i64::from(risk) > *max {
                Err(CapabilityError::RiskTooHigh {
                    risk,
                    max: *max,
                    caveat: *caveat,
                })
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}
