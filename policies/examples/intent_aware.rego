# Uses the intent stage's record: tools the intent forbids are blocked, tools outside a confident
# intent go to review, tools inside it are allowed. Patterns match as the intent plugin matches
# them: `*` crosses every character, `.` included (`null` delimiters; `[]` would make `.` one,
# so `db.*` would match `db.delete_rows` while `*delete*` did not).
package intentgate.policy

default decision := {"allow": false, "reason": "no matching intent"}

forbidden if {
	some pattern in input.intent.forbidden_tools
	glob.match(pattern, null, input.tool)
}

in_intent if {
	some pattern in input.intent.allowed_tools
	glob.match(pattern, null, input.tool)
}

decision := {"allow": false, "reason": "tool forbidden by the stated intent"} if forbidden

decision := {"allow": true, "reason": "tool fits the stated intent"} if {
	not forbidden
	in_intent
}

decision := {"allow": false, "escalate": true, "reason": "tool outside a confident intent"} if {
	not forbidden
	not in_intent
	input.intent.confidence >= 0.5
}
