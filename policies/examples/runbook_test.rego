package intentgate.policy_test

import data.intentgate.policy

test_read_invoice_allowed if {
	d := policy.decision with input as {"tool": "read_invoice", "agent": {"calls_today_for_tool": 999}}
	d.allow == true
}

test_email_under_quota_allowed if {
	d := policy.decision with input as {"tool": "send_email_internal", "agent": {"calls_today_for_tool": 49}}
	d.allow == true
	not d.escalate
}

test_email_over_quota_escalates_with_step_up if {
	d := policy.decision with input as {"tool": "send_email_internal", "agent": {"calls_today_for_tool": 50}}
	d.allow == false
	d.escalate == true
	d.requires_step_up == true
}

test_other_tools_denied if {
	d := policy.decision with input as {"tool": "delete_invoice", "agent": {"calls_today_for_tool": 0}}
	d.allow == false
	not d.escalate
}
