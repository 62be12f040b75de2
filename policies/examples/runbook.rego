# The operator runbook's first policy: read_invoice allowed, internal email under a daily quota,
# escalation with step-up above it, everything else denied.
package intentgate.policy

default decision := {
  "allow":  false,
  "reason": "denied by default"
}

# Allow the read_invoice tool unconditionally.
decision := {"allow": true, "reason": "read-only invoice access"} if {
  input.tool == "read_invoice"
}

# Allow internal email under a budget, escalate above it. The count is this replica's (usage is
# kept per gateway process, from its start): with several replicas, or to survive restarts,
# make the quota a budget ceiling (the budget stage's counters are shared through the store).
decision := {"allow": true, "reason": "internal email under daily quota"} if {
  input.tool == "send_email_internal"
  input.agent.calls_today_for_tool < 50
}

decision := {
  "allow":            false,
  "escalate":         true,
  "reason":           "internal email over daily quota — review",
  "requires_step_up": true
} if {
  input.tool == "send_email_internal"
  input.agent.calls_today_for_tool >= 50
}
