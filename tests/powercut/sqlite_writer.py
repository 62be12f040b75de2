"""Power-cut self-test: commits one row per transaction into table t of DB (WAL mode) with
PRAGMA synchronous=MODE, printing `ACK <n>` after each commit returns, until killed."""
import sqlite3
import sys
import time

path, mode = sys.argv[1], sys.argv[2]
c = sqlite3.connect(path, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute(f"PRAGMA synchronous={mode}")
n = 0
while n < 100000:
    n += 1
    c.execute("INSERT INTO t(v) VALUES (?)", (n,))
    print(f"ACK {n}", flush=True)
time.sleep(600)
