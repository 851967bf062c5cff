//! The appraisal policy, in Rego, evaluated in-process with regorus. The default
//! policy ships in `policy/attest.rego`; `attest_policy_file` replaces it. The policy
//! turns the appraisal's signals and risk into a status and validity conditions.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vouch_proto::attest::EarStatus;

pub const DEFAULT_POLICY: &str = include_str!("../../policy/attest.rego");
const DECISION_RULE: &str = "data.vouch.attest.decision";

#[derive(Debug, thiserror::Error)]
#[error("appraisal policy: {0}")]
pub struct PolicyError(String);

#[derive(Debug, Clone, Serialize)]
pub struct PolicyInput<'a> {
    pub device: PolicyDevice<'a>,
    pub signals: Vec<PolicySignal<'a>>,
    pub risk: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyDevice<'a> {
    pub kind: &'a str,
    pub model: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicySignal<'a> {
    pub code: &'a str,
    pub severity: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Decision {
    pub status: EarStatus,
    pub operations: Vec<String>,
    pub max_amount_minor: i64,
    pub policy_id: String,
    pub policy_version: String,
}

impl Decision {
    /// `ear_appraisal_policy_id`: id and version together.
    pub fn policy_ref(&self) -> String {
        format!("{}@{}", self.policy_id, self.policy_version)
    }
}

/// A compiled policy. Each evaluation runs on a clone, so concurrent appraisals never
/// share interpreter state.
#[derive(Debug)]
pub struct Policy {
    engine: Mutex<regorus::Engine>,
}

impl Policy {
    pub fn compile(source_name: &str, rego: &str) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.add_policy(source_name.to_owned(), rego.to_owned()).map_err(|e| PolicyError(e.to_string()))?;
        let policy = Policy { engine: Mutex::new(engine) };
        // A policy that cannot decide a clean device is refused at start, not at the
        // first attestation.
        let probe = PolicyInput { device: PolicyDevice { kind: "terminal", model: "probe" }, signals: vec![], risk: 0 };
        policy.decide(&probe)?;
        Ok(policy)
    }

    pub fn decide(&self, input: &PolicyInput<'_>) -> Result<Decision, PolicyError> {
        let mut engine = self.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let input_json = serde_json::to_string(input).map_err(|e| PolicyError(e.to_string()))?;
        engine.set_input(regorus::Value::from_json_str(&input_json).map_err(|e| PolicyError(e.to_string()))?);
        let value = engine.eval_rule(DECISION_RULE.to_owned()).map_err(|e| PolicyError(e.to_string()))?;
        let json = value.to_json_str().map_err(|e| PolicyError(e.to_string()))?;
        serde_json::from_str(&json).map_err(|e| PolicyError(format!("decision {json} is malformed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(signals: &[(&str, &str)], risk: u8) -> Decision {
        let policy = Policy::compile("attest.rego", DEFAULT_POLICY).unwrap();
        let signals = signals.iter().map(|&(code, severity)| PolicySignal { code, severity }).collect();
        policy.decide(&PolicyInput { device: PolicyDevice { kind: "terminal", model: "m" }, signals, risk }).unwrap()
    }

    #[test]
    fn default_policy_decisions() {
        let clean = decide(&[], 0);
        assert_eq!(clean.status, EarStatus::Affirming);
        assert_eq!(clean.policy_ref(), "vouch-attest-default@1");
        assert!(clean.operations.contains(&"payment".to_owned()));
        assert_eq!(decide(&[("rooted", "critical")], 60).status, EarStatus::Contraindicated);
        assert_eq!(decide(&[("broken_state_chain", "high")], 35).status, EarStatus::Contraindicated);
        let warned = decide(&[("os_patch_outdated", "medium")], 15);
        assert_eq!((warned.status, warned.max_amount_minor), (EarStatus::Warning, 5000));
        assert_eq!(decide(&[], 30).status, EarStatus::Warning);
        assert!(decide(&[("hooked", "critical")], 60).operations.is_empty());
    }

    #[test]
    fn a_policy_that_cannot_decide_is_refused() {
        assert!(Policy::compile("bad.rego", "package vouch.attest\n\ndecision := {").is_err());
        assert!(Policy::compile("empty.rego", "package vouch.attest\n\nx := 1").is_err());
    }
}
