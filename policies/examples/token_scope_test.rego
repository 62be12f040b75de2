package intentgate.policy_test

import data.intentgate.policy

test_allows_a_scoped_call if {
	d := policy.decision with input as {"tool": "read_invoice", "args": {}, "agent_id": "a", "capability": {"subject": "a", "tenant": "default", "zone": "default"}}
	d.allow == true
}

test_escalates_destructive_tools if {
	d := policy.decision with input as {"tool": "delete_records", "args": {}, "agent_id": "a", "capability": {"subject": "a", "tenant": "default", "zone": "default"}}
	d.allow == false
	d.escalate == true
	d.requires_step_up == true
}

test_denies_without_capability if {
	d := policy.decision with input as {"tool": "read_invoice", "args": {}}
	d.allow == false
}
