-- The lease columns of migrations/postgres/0009_outbox_leases.sql, for one schema on both
-- stores (on SQLite one process owns the file and keeps its lanes apart in memory, so the
-- leases stay empty).
ALTER TABLE outbox_lanes ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox_lanes ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
