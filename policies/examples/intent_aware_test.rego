package intentgate.policy_test

import data.intentgate.policy

intent := {"allowed_tools": ["read_*"], "forbidden_tools": ["delete_*"], "confidence": 0.9}

test_fits_intent if {
	policy.decision.allow with input as {"tool": "read_invoice", "intent": intent}
}

test_forbidden if {
	d := policy.decision with input as {"tool": "delete_invoice", "intent": intent}
	d.allow == false
	not d.escalate
}

test_outside_confident_intent_escalates if {
	d := policy.decision with input as {"tool": "pay", "intent": intent}
	d.escalate == true
}

test_no_intent_denied if {
	d := policy.decision with input as {"tool": "pay"}
	d.allow == false
	not d.escalate
}

dotted := {"allowed_tools": ["db.*"], "forbidden_tools": ["*delete*"], "confidence": 0.9}

test_a_forbidden_pattern_crosses_dots if {
	d := policy.decision with input as {"tool": "db.delete_rows", "intent": dotted}
	d.allow == false
	not d.escalate
}

test_an_allowed_pattern_crosses_dots if {
	policy.decision.allow with input as {"tool": "db.read.rows", "intent": dotted}
}
