//! Bundle specifications and their content digest, and the default bundle (the built-in
//! components with the default configuration, embedded in the binary).
//!
//! The digest is SHA-256 over the spec's canonical serialization (stages in pipeline order,
//! checks in order, component digests and configuration text), so equal content means equal
//! digest and any change to a component or a configuration changes it.

use crate::plugins::Stage;
use crate::plugins::artifacts;
use crate::plugins::runtime::digest_of;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One check in a stage.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// The component (`sha256:<hex>` of its bytes).
    pub component: String,
    /// Its configuration text (for the Rego policy: Rego source, or JSON with modules/tests/data).
    #[serde(default)]
    pub config: String,
}

/// What a bundle contains: per stage, the checks in order. In the intent stage the first check
/// produces the intent record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSpec {
    /// Checks per stage.
    pub stages: BTreeMap<Stage, Vec<CheckSpec>>,
}

impl BundleSpec {
    /// `sha256:<hex>` over the canonical serialization.
    pub fn digest(&self) -> String {
        // Serialization of a BTreeMap-keyed struct of strings cannot fail.
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        digest_of(&canonical)
    }

    /// The checks of a stage (empty when absent).
    pub fn checks(&self, stage: Stage) -> &[CheckSpec] {
        self.stages.get(&stage).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every component digest the spec refers to.
    pub fn component_digests(&self) -> impl Iterator<Item = &str> {
        self.stages.values().flatten().map(|c| c.component.as_str())
    }

    /// The default bundle: built-in intent (no rules), the default Rego policy (deny by
    /// default, with its tests), built-in budget (token `max_calls` only).
    pub fn builtin() -> Self {
        let [intent, policy, budget, _] = builtin_components();
        let mut stages = BTreeMap::new();
        stages.insert(
            Stage::Intent,
            vec![CheckSpec {
                component: digest_of(intent.1),
                config: String::new(),
            }],
        );
        stages.insert(
            Stage::Policy,
            vec![CheckSpec {
                component: digest_of(policy.1),
                config: default_policy_config(),
            }],
        );
        stages.insert(
            Stage::Budget,
            vec![CheckSpec {
                component: digest_of(budget.1),
                config: String::new(),
            }],
        );
        Self { stages }
    }

    /// A copy with the policy stage's first check replaced by the built-in Rego policy with
    /// this configuration (the `/v1/admin/policies` shorthand).
    pub fn with_policy_config(&self, config: String) -> Self {
        let mut spec = self.clone();
        let rego = digest_of(artifacts::POLICY_REGO);
        let checks = spec.stages.entry(Stage::Policy).or_default();
        let check = CheckSpec {
            component: rego,
            config,
        };
        match checks.first_mut() {
            Some(first) => *first = check,
            None => checks.push(check),
        }
        spec
    }
}

/// The embedded components: (name, bytes) for intent, policy-rego, budget, siem-json.
pub fn builtin_components() -> [(&'static str, &'static [u8]); 4] {
    [
        ("intent", artifacts::INTENT),
        ("policy-rego", artifacts::POLICY_REGO),
        ("budget", artifacts::BUDGET),
        ("siem-json", artifacts::SIEM_JSON),
    ]
}

/// The default policy stage configuration: `policies/default.rego` with its tests.
pub fn default_policy_config() -> String {
    serde_json::json!({
        "modules": {"default.rego": include_str!("../../../policies/default.rego")},
        "tests": {"default_test.rego": include_str!("../../../policies/default_test.rego")},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_covers_components_and_configuration() {
        let a = BundleSpec::builtin();
        assert_eq!(a.digest(), BundleSpec::builtin().digest());
        assert!(a.digest().starts_with("sha256:") && a.digest().len() == 71);
        let b = a.with_policy_config("package intentgate.policy\n".into());
        assert_ne!(a.digest(), b.digest());
        let mut c = a.clone();
        if let Some(checks) = c.stages.get_mut(&Stage::Budget) {
            checks[0].component = digest_of(b"other");
        }
        assert_ne!(a.digest(), c.digest());
    }
}
