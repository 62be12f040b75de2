"""Power-cut self-test: makes durable and non-durable changes in DIR, prints READY, and waits
to be killed. Files `kept`, `old-name`, `doomed` and `cut` exist before it runs."""
import os
import sys
import time

d = sys.argv[1]


def fsync_dir():
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


f = os.open(os.path.join(d, "kept"), os.O_RDWR)
os.pwrite(f, b"A" * 100, 0)
os.fsync(f)  # durable: 100 x A
os.pwrite(f, b"B" * 50, 100)  # extends the file, never synced
os.pwrite(f, b"C" * 10, 0)  # overwrites synced bytes, never synced

g = os.open(os.path.join(d, "new-synced"), os.O_CREAT | os.O_WRONLY, 0o644)
os.write(g, b"durable")
os.fsync(g)
os.close(g)
fsync_dir()  # durable: the name new-synced

# After the last directory sync: a creation (its data synced, its name not), a rename, an
# unlink, and a truncation that is never synced.
h = os.open(os.path.join(d, "new-unsynced"), os.O_CREAT | os.O_WRONLY, 0o644)
os.write(h, b"synced data, unsynced name")
os.fsync(h)
os.close(h)
os.rename(os.path.join(d, "old-name"), os.path.join(d, "new-name"))
os.unlink(os.path.join(d, "doomed"))
os.link(os.path.join(d, "new-synced"), os.path.join(d, "hard-link"))
t = os.open(os.path.join(d, "cut"), os.O_RDWR)
os.ftruncate(t, 3)

print("READY", flush=True)
time.sleep(600)
