# Vouch's default appraisal policy.
#
# Input (built by the server from the evidence, the reference values and the
# device's history):
#   input.device.kind      "reader" | "pos" | "terminal" | "consumer"
#   input.device.model     string
#   input.signals          [{"code": string, "severity": "critical" | "high" | "medium" | "low"}]
#   input.risk             0..100
#
# Output: data.vouch.attest.decision = {status, operations, max_amount_minor,
# policy_id, policy_version}. Replace this file with `attest_policy_file` in the
# configuration; keep the package and the shape of `decision`.
package vouch.attest

import rego.v1

policy_id := "vouch-attest-default"

policy_version := "1"

blocking contains s.code if {
	some s in input.signals
	s.severity in {"critical", "high"}
}

cautionary contains s.code if {
	some s in input.signals
	s.severity in {"medium", "low"}
}

status := "contraindicated" if {
	count(blocking) > 0
} else := "contraindicated" if {
	input.risk >= 60
} else := "warning" if {
	count(cautionary) > 0
} else := "warning" if {
	input.risk >= 25
} else := "affirming"

operations := ["payment", "session", "token", "dvv", "offline", "tsm"] if status == "affirming"

operations := ["payment"] if status == "warning"

operations := [] if status == "contraindicated"

max_amount_minor := 100000 if status == "affirming"

max_amount_minor := 5000 if status == "warning"

max_amount_minor := 0 if status == "contraindicated"

decision := {
	"status": status,
	"operations": operations,
	"max_amount_minor": max_amount_minor,
	"policy_id": policy_id,
	"policy_version": policy_version,
}
