-- The check that escalated an approval's call (`intent`, `policy` or `budget`): an approval
-- answers that check's escalation only, so a person who approved what one check asked about
-- never waives what another check would have asked. Rows written before (or by an older
-- binary, which only escalates from the policy) are the policy's.
ALTER TABLE approvals ADD COLUMN escalated_by TEXT NOT NULL DEFAULT 'policy';
