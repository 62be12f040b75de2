#!/usr/bin/env python3
"""What the audit schema's indexes cost SQLite itself, per event, for one tenant and for 16.

The audit writer inserts each event into `audit_events` and its indexes (migrations/sqlite);
`intentgate-bench micro audit` measures the whole writer. This script isolates the B-tree work:
the same schema (0002 + 0007), a 600-byte body, commits shaped like the writer's (every
tenant's part in one transaction, grouped by tenant: 1 x 128 events, or 16 tenants x 8), and
CPU time per event with `synchronous=OFF` (no disk in the figure). It runs the schema as it is
and without the two query indexes `(tenant, agent_id)` and `(tenant, tool)`, twice each.

Python's `sqlite3` module (the system's SQLite, not the gateway's bundled build) adds a few
microseconds an insert: compare the rows, not the absolute figures.

    python3 benches/sqlite_index_cost.py
"""
import os
import sqlite3
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "migrations", "sqlite")
SCHEMA = "".join(
    open(os.path.join(ROOT, name)).read()
    for name in ("0002_audit.sql", "0007_audit_token_index.sql")
)
LEAN = SCHEMA.replace(
    "CREATE INDEX IF NOT EXISTS audit_events_tenant_agent ON audit_events (tenant, agent_id);", ""
).replace("CREATE INDEX IF NOT EXISTS audit_events_tenant_tool ON audit_events (tenant, tool);", "")
assert LEAN != SCHEMA, "the index definitions moved: update this script"

INSERT = (
    "INSERT INTO audit_events (tenant, seq, ts_ms, event, decision, check_name, agent_id, tool, "
    "jti, root_jti, elevation_id, body, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def per_event_us(schema: str, tenants: int, per_part: int, events: int = 112_000) -> float:
    with tempfile.TemporaryDirectory() as d:
        c = sqlite3.connect(os.path.join(d, "a.db"), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=OFF")
        c.execute("PRAGMA cache_size=-32768")
        c.executescript(schema)
        body = '{"x":"' + "a" * 600 + '"}'
        seqs = [0] * tenants
        done = commit = 0
        t = time.process_time()
        while done < events:
            c.execute("BEGIN IMMEDIATE")
            for ten in range(tenants):
                for _ in range(per_part):
                    seqs[ten] += 1
                    c.execute(INSERT, (f"tenant-{ten:02}", seqs[ten], 1_700_000_000_000 + commit,
                                       "tool_call", "allow", "", "agent-1", "echo", f"jti-{ten}",
                                       f"jti-{ten}", "", body, "0" * 64, "f" * 64))
                    done += 1
            c.execute("COMMIT")
            commit += 1
        spent = time.process_time() - t
        c.close()
        return spent / done * 1e6


if __name__ == "__main__":
    print("| schema | 1 tenant x 128, µs/event | 16 tenants x 8, µs/event |")
    print("|---|---:|---:|")
    for _ in range(2):
        for name, schema in (("as migrated", SCHEMA), ("without (tenant, agent_id), (tenant, tool)", LEAN)):
            print(f"| {name} | {per_event_us(schema, 1, 128):.1f} | {per_event_us(schema, 16, 8):.1f} |",
                  flush=True)
