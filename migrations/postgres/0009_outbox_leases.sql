-- Outbox lanes are claimed by a lease (host/src/outbox/store.rs) instead of a row lock held in a
-- transaction for the whole delivery: a slow destination no longer keeps a pooled connection
-- and an open transaction (cut by idle_in_transaction_session_timeout) per lane. A lane is
-- taken when its lease has run out; a replica that dies releases its lanes when their leases do.
ALTER TABLE outbox_lanes ADD COLUMN IF NOT EXISTS lease_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox_lanes ADD COLUMN IF NOT EXISTS lease_until BIGINT NOT NULL DEFAULT 0;
