package intentgate.policy_test

import data.intentgate.policy

test_denies_everything if {
	d := policy.decision with input as {"tool": "read_invoice", "args": {}, "agent_id": "a"}
	d.allow == false
	d.reason == "denied by default"
}

test_denies_without_input if {
	policy.decision.allow == false
}
