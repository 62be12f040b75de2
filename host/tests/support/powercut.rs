//! A power cut on a data directory, for tests: run a process under the LD_PRELOAD shim of
//! `tests/powercut/powercut.c` (it journals the pre-image of every write under the directory,
//! and each fsync), kill it with SIGKILL, then [`PowerCut::restore`] undoes every change no sync
//! made durable, newest first. The directory then holds what a machine that lost power at the
//! moment of the kill would find on its disk, in the worst case POSIX allows: every unsynced
//! write, creation, unlink and rename dropped, SQLite's mmapped `-shm` index gone.
//!
//! `kill -9` alone keeps the page cache, so it cannot show a missing fsync; this can. It must
//! never be used on a directory a live process still writes to (restore after the kill).
//!
//! The record layout mirrors `struct hdr` in the C file (112 bytes, little-endian).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const MAGIC: u32 = 0x5455_4350;
const HEADER: usize = 112;
const K_WRITE: u32 = 1;
const K_CREATE: u32 = 2;
const K_UNLINK: u32 = 3;
const K_RENAME: u32 = 4;
const K_SYNC: u32 = 5;
const K_SYNCALL: u32 = 6;

/// The shim, compiled once per test process into `CARGO_TARGET_TMPDIR`.
pub fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/powercut/powercut.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(dir).expect("target tmpdir");
        let out = dir.join(format!("powercut-{}.so", std::process::id()));
        let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(src)
            .args(["-ldl", "-lpthread"])
            .status()
            .expect("a C compiler (cc) for the power-cut shim");
        assert!(status.success(), "the power-cut shim compiles");
        out
    })
}

/// One record of the journal.
#[derive(Debug, Clone)]
struct Record {
    kind: u32,
    seq: u64,
    dev: u64,
    ino: u64,
    dir: (u64, u64),
    dir2: (u64, u64),
    offset: u64,
    old_size: u64,
    upto: u64,
    path: PathBuf,
    /// WRITE: the old bytes; RENAME: the new path.
    data: Vec<u8>,
    /// UNLINK/RENAME: the hard-linked backup of what the change removed, if any.
    backup: Option<PathBuf>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn path_of(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

/// The complete records of `bytes`; a record cut short by the kill ends the journal (it was
/// written before its change, which therefore never ran).
fn parse(bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let h = &bytes[at..at + HEADER];
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        assert_eq!(magic, MAGIC, "power-cut journal corrupt at byte {at}");
        let kind = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let (l1, l2, l3) = (
            u64_at(h, 88) as usize,
            u64_at(h, 96) as usize,
            u64_at(h, 104) as usize,
        );
        let end = at + HEADER + l1 + l2 + l3;
        if end > bytes.len() {
            break;
        }
        let body = &bytes[at + HEADER..end];
        out.push(Record {
            kind,
            seq: u64_at(h, 8),
            dev: u64_at(h, 16),
            ino: u64_at(h, 24),
            dir: (u64_at(h, 32), u64_at(h, 40)),
            dir2: (u64_at(h, 48), u64_at(h, 56)),
            offset: u64_at(h, 64),
            old_size: u64_at(h, 72),
            upto: u64_at(h, 80),
            path: path_of(&body[..l1]),
            data: body[l1..l1 + l2].to_vec(),
            backup: (l3 > 0).then(|| path_of(&body[l1 + l2..])),
        });
        at = end;
    }
    out
}

/// What a restore did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    /// Records in the journal.
    pub records: usize,
    /// Data changes journaled (durable or not).
    pub writes: usize,
    /// Changes undone (not covered by a sync).
    pub undone: usize,
    /// Bytes of file data put back or cut off.
    pub bytes_dropped: u64,
    /// `-shm` files deleted.
    pub shm_deleted: usize,
}

/// A data directory watched by the shim, with its journal beside it (not inside).
pub struct PowerCut {
    root: tempfile::TempDir,
    data: PathBuf,
    journal: PathBuf,
}

impl Default for PowerCut {
    fn default() -> Self {
        Self::new()
    }
}

impl PowerCut {
    pub fn new() -> PowerCut {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("data");
        fs::create_dir(&data).expect("data dir");
        let journal = root.path().join("powercut.journal");
        PowerCut {
            root,
            data,
            journal,
        }
    }

    /// The watched directory (give it to the process as its data directory).
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The scratch directory beside the data directory (not watched).
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }

    /// Runs `cmd` under the shim, watching the data directory; [`PowerCut::cut`] lands right
    /// after its next write.
    pub fn arm(&self, cmd: &mut Command) {
        self.arm_cut_after(cmd, 1);
    }

    /// [`PowerCut::arm`], with [`PowerCut::cut`] landing after the `writes`-th write after it
    /// (so a cut can fall in the middle of a commit, not only before its first write).
    pub fn arm_cut_after(&self, cmd: &mut Command, writes: usize) {
        cmd.env("POWERCUT_CUT_AFTER", writes.max(1).to_string())
            .env("LD_PRELOAD", shim())
            .env("POWERCUT_DIR", &self.data)
            .env("POWERCUT_JOURNAL", &self.journal);
    }

    /// Cuts the power under `child` (armed with [`PowerCut::arm`]): asks the shim to SIGKILL
    /// it right after its next journaled write (SIGUSR2; or the n-th with
    /// [`PowerCut::arm_cut_after`]), so the cut lands between a write and its sync, and waits
    /// for it to die. Then call [`PowerCut::restore`].
    pub fn cut(&self, child: &mut std::process::Child) {
        self.cut_at_next_write(child);
        self.wait_cut(child);
    }

    /// The first half of [`PowerCut::cut`]: the shim kills `child` at its next write.
    pub fn cut_at_next_write(&self, child: &std::process::Child) {
        let sent = Command::new("kill")
            .args(["-USR2", &child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success(), "SIGUSR2 sent");
    }

    /// The second half of [`PowerCut::cut`]: waits until the shim has killed `child`.
    pub fn wait_cut(&self, child: &mut std::process::Child) {
        use std::os::unix::process::ExitStatusExt;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < until,
                "no write within 30 s of the cut signal"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status.signal(), Some(9), "the shim killed it: {status:?}");
    }

    /// After the watched process was killed: undoes every change no sync made durable, newest
    /// first, deletes the `-shm` files, and clears the journal for the next run.
    pub fn restore(&self) -> Restored {
        let bytes = match fs::read(&self.journal) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("read the power-cut journal: {e}"),
        };
        let records = parse(&bytes);
        let mut synced: HashMap<(u64, u64), u64> = HashMap::new();
        let mut all = 0u64;
        for r in &records {
            match r.kind {
                K_SYNC => {
                    let e = synced.entry((r.dev, r.ino)).or_default();
                    *e = (*e).max(r.upto);
                }
                K_SYNCALL => all = all.max(r.upto),
                _ => {}
            }
        }
        let durable =
            |id: (u64, u64), seq: u64| all > seq || synced.get(&id).is_some_and(|u| *u > seq);
        let is = |p: &Path, dev: u64, ino: u64| {
            fs::symlink_metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        };
        let mut done = Restored {
            records: records.len(),
            writes: records.iter().filter(|r| r.kind == K_WRITE).count(),
            ..Restored::default()
        };
        for r in records.iter().rev() {
            match r.kind {
                K_WRITE if !durable((r.dev, r.ino), r.seq) => {
                    // A path that now names another file (or none): the changed file is gone
                    // for good, by a later change that was durable.
                    if !is(&r.path, r.dev, r.ino) {
                        continue;
                    }
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&r.path)
                        .expect("open to restore");
                    let now = f.metadata().expect("metadata").len();
                    f.set_len(r.old_size).expect("restore the size");
                    f.write_all_at(&r.data, r.offset).expect("restore bytes");
                    done.bytes_dropped += now.abs_diff(r.old_size) + r.data.len() as u64;
                    done.undone += 1;
                }
                K_CREATE if !durable(r.dir, r.seq) && is(&r.path, r.dev, r.ino) => {
                    fs::remove_file(&r.path).expect("undo a creation");
                    done.undone += 1;
                }
                K_UNLINK if !durable(r.dir, r.seq) => {
                    if let Some(b) = &r.backup
                        && fs::symlink_metadata(&r.path).is_err()
                    {
                        fs::hard_link(b, &r.path).expect("undo an unlink");
                        done.undone += 1;
                    }
                }
                K_RENAME if !(durable(r.dir, r.seq) && durable(r.dir2, r.seq)) => {
                    let to = path_of(&r.data);
                    if is(&to, r.dev, r.ino) {
                        fs::rename(&to, &r.path).expect("undo a rename");
                        if let Some(b) = &r.backup {
                            fs::hard_link(b, &to).expect("bring back the replaced file");
                        }
                        done.undone += 1;
                    }
                }
                _ => {}
            }
        }
        done.shm_deleted = delete_shm(&self.data);
        // The next run starts a fresh journal.
        for e in fs::read_dir(self.root.path())
            .expect("scratch dir")
            .flatten()
        {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("powercut.journal") {
                let _ = fs::remove_file(e.path());
            }
        }
        done
    }
}

fn delete_shm(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).expect("data dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            n += delete_shm(&p);
        } else if p.to_string_lossy().ends_with("-shm") {
            fs::remove_file(&p).expect("delete -shm");
            n += 1;
        }
    }
    n
}
