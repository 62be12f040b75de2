# Allow what the capability token allows, deny the rest; destructive tools go to a human.
#
# The capability check runs before the policy, so a call that reaches this policy is already
# inside the token's tool scope. `intentgate serve --demo` and the test gateways use this policy;
# a production deployment writes its own (see runbook.rego).
package intentgate.policy

default decision := {
	"allow": false,
	"reason": "denied by default",
}

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
}
