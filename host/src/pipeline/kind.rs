//! What kind of MCP target a decided call reaches (a tool, a resource, a prompt, or a
//! completion for a prompt or resource template), and how checks and audit events name it.
//!
//! The check plugins' WIT record (`tool-call`) has one name field, `tool`. A call of another
//! kind is presented there qualified by its kind — `resource:<uri>`, `prompt:<name>`,
//! `completion:prompt:<name>`, `completion:resource:<uri template>` — so a policy or intent rule
//! written for tool names never matches a resource or a prompt by accident, the policy plugin
//! can tell the kind apart (it adds `input.kind` and `input.target`), and an audit event's `tool`
//! replays to the same decision in a dry run. Tool names themselves are never qualified: a
//! `tools/call` whose name starts with a reserved prefix is refused before the pipeline
//! ([`is_reserved_tool_name`]). This module must never produce the same name for two targets
//! of different kinds.

use std::borrow::Cow;

use crate::capability::Kind;

/// The kind of target one call reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallKind {
    /// `tools/call`.
    #[default]
    Tool,
    /// `resources/read` and `resources/subscribe` (told apart by the arguments the checks see:
    /// `{"operation": "read" | "subscribe"}`).
    Resource,
    /// `prompts/get`.
    Prompt,
    /// `completion/complete` for a prompt's (`Kind::Prompt`) or a resource template's
    /// (`Kind::Resource`) argument.
    Completion(Kind),
    /// `sampling/createMessage` the upstream sends the agent while a tool runs: the upstream
    /// acting toward the agent's user, named by the tool that asked.
    Sampling,
    /// `elicitation/create` the upstream sends the agent while a tool runs (as `Sampling`).
    Elicitation,
    /// `roots/list` the upstream sends the agent while a tool runs (as `Sampling`).
    Roots,
}

/// Prefixes that qualify the names of the kinds other than tools.
const RESERVED: &[&str] = &[
    "resource:",
    "prompt:",
    "completion:",
    "sampling:",
    "elicitation:",
    "roots:",
];

impl CallKind {
    /// The kind as the policy input and the audit log name it.
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Tool => "tool",
            CallKind::Resource => "resource",
            CallKind::Prompt => "prompt",
            CallKind::Completion(_) => "completion",
            CallKind::Sampling => "sampling",
            CallKind::Elicitation => "elicitation",
            CallKind::Roots => "roots",
        }
    }

    /// The kind of a request an upstream sends the agent, by its method.
    pub fn of_server_request(method: &str) -> Option<CallKind> {
        match method {
            "sampling/createMessage" => Some(CallKind::Sampling),
            "elicitation/create" => Some(CallKind::Elicitation),
            "roots/list" => Some(CallKind::Roots),
            _ => None,
        }
    }

    /// Whether this is a request of the upstream toward the agent (decided, never charged).
    pub fn is_server_request(self) -> bool {
        matches!(
            self,
            CallKind::Sampling | CallKind::Elicitation | CallKind::Roots
        )
    }

    /// The kind of caveat that governs the target (`tool_*`, `resource_*`, `prompt_*`): a
    /// completion reveals values of its prompt's or template's arguments, so it is in scope
    /// only where that prompt or template is.
    pub fn capability_kind(self) -> Kind {
        match self {
            CallKind::Tool => Kind::Tool,
            CallKind::Resource => Kind::Resource,
            CallKind::Prompt => Kind::Prompt,
            CallKind::Completion(k) => k,
            // In scope where the tool that asks is.
            CallKind::Sampling | CallKind::Elicitation | CallKind::Roots => Kind::Tool,
        }
    }

    /// The name checks and audit events see for `target` (a tool name, a URI, a prompt name).
    pub fn qualified(self, target: &str) -> Cow<'_, str> {
        match self {
            CallKind::Tool => Cow::Borrowed(target),
            CallKind::Resource => Cow::Owned(format!("resource:{target}")),
            CallKind::Prompt => Cow::Owned(format!("prompt:{target}")),
            CallKind::Completion(k) => Cow::Owned(format!("completion:{}:{target}", k.as_str())),
            CallKind::Sampling => Cow::Owned(format!("sampling:{target}")),
            CallKind::Elicitation => Cow::Owned(format!("elicitation:{target}")),
            CallKind::Roots => Cow::Owned(format!("roots:{target}")),
        }
    }
}

/// Whether a tool name would read as another kind's qualified name (refused for `tools/call`).
pub fn is_reserved_tool_name(name: &str) -> bool {
    RESERVED.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names_never_collide_across_kinds() {
        let kinds = [
            CallKind::Tool,
            CallKind::Resource,
            CallKind::Prompt,
            CallKind::Completion(Kind::Prompt),
            CallKind::Completion(Kind::Resource),
            CallKind::Sampling,
            CallKind::Elicitation,
            CallKind::Roots,
        ];
        let names: Vec<String> = kinds
            .iter()
            .map(|k| k.qualified("x").into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "x",
                "resource:x",
                "prompt:x",
                "completion:prompt:x",
                "completion:resource:x",
                "sampling:x",
                "elicitation:x",
                "roots:x"
            ]
        );
        for n in &names[1..] {
            assert!(is_reserved_tool_name(n), "{n}");
        }
        assert!(!is_reserved_tool_name("read_invoice"));
        assert!(!is_reserved_tool_name("resources"));
        assert_eq!(
            CallKind::Completion(Kind::Prompt).capability_kind(),
            Kind::Prompt
        );
    }
}
