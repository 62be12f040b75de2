# Allow what the capability token allows, deny the rest; destructive tools go to a human.
#
# The capability check runs before the policy, so a call that reaches this policy is already
# inside the token's tool scope. `intentgate serve --demo` and the test gateways use this policy;
# a production deployment writes its own (see runbook.rego).
#
# One rule whose `else` chain ends in the denial: it decides the same as a `default decision`
# beside it (no body of the chain holds: denied), and regorus evaluates it in one pass, where a
# `default` rule costs a second one on every call.
package intentgate.policy

decision := {
	"allow": false,
	"escalate": true,
	"requires_step_up": true,
	"reason": "destructive tool: needs human approval",
} if {
	startswith(input.tool, "delete_")
} else := {
	"allow": true,
	"reason": "within the capability token's scope",
} if {
	input.capability.subject != ""
} else := {
	"allow": false,
	"reason": "denied by default",
}
