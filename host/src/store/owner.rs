//! One gateway process per SQLite file. The audit writer decides every conditional charge under
//! SQLite's write lock, so charges would stay exact with two processes on one file; but two
//! processes would race for that lock on every batch and each would pay the other's fsyncs. So a
//! SQLite store is owned: the first process to open it takes an exclusive lock on a file beside
//! it (`<database>-lock`), and another process opening it is refused with an error that says
//! what to do (stop the other one, or share PostgreSQL between replicas). Gateways in one
//! process (tests, an embedding host) share the ownership. The lock is the operating system's
//! (`flock`), so a process that dies, even by `kill -9`, releases it.
//!
//! This module must never let a second process open a file that is owned, and never block: a
//! refused open fails at once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::StoreError;

/// This process's ownership of one SQLite file, released when the last store of it is dropped,
/// and what every store of the file in this process shares.
#[derive(Debug)]
pub struct Owner {
    _lock: File,
    /// Session ids with no row in the file ([`super::absent`]).
    pub absent: super::absent::AbsentSessions,
}

/// The files this process owns, by the lock file's canonical path.
fn owned() -> &'static Mutex<HashMap<PathBuf, Weak<Owner>>> {
    static OWNED: OnceLock<Mutex<HashMap<PathBuf, Weak<Owner>>>> = OnceLock::new();
    OWNED.get_or_init(Mutex::default)
}

/// The lock file beside `db`.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-lock");
    db.with_file_name(name)
}

/// Takes (or shares, within this process) the ownership of the SQLite file `db`, whose
/// directory exists.
pub fn own(db: &Path) -> Result<Arc<Owner>, StoreError> {
    // The file itself, not the name it was reached by: two processes opening one database
    // through a symbolic link and its target would otherwise lock two different files.
    let resolved = std::fs::canonicalize(db).ok();
    let path = lock_path(resolved.as_deref().unwrap_or(db));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let key = match dir {
        Some(d) => std::fs::canonicalize(d)
            .map_err(|e| StoreError::Config(format!("cannot resolve {}: {e}", d.display())))?
            .join(path.file_name().unwrap_or_default()),
        None => std::env::current_dir()
            .map_err(|e| StoreError::Config(format!("cannot resolve the working directory: {e}")))?
            .join(&path),
    };
    let mut owned = owned()
        .lock()
        .map_err(|_| StoreError::Config("the SQLite ownership table is poisoned".into()))?;
    if let Some(owner) = owned.get(&key).and_then(Weak::upgrade) {
        return Ok(owner);
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::Config(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let by = if holder.is_empty() {
                String::new()
            } else {
                format!(" (process {holder})")
            };
            return Err(StoreError::Config(format!(
                "the SQLite database {} is in use by another IntentGate process{by}: one \
                 process owns a SQLite file (its lock is {}). Stop the other gateway, give \
                 this one its own --data-dir, or share INTENTGATE_POSTGRES_URL between replicas",
                db.display(),
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(StoreError::Config(format!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    // Who owns it, for the refusal above (advisory: the lock is what counts).
    if file.set_len(0).is_ok() {
        let _ = writeln!(file, "{}", std::process::id());
    }
    let owner = Arc::new(Owner {
        _lock: file,
        absent: Default::default(),
    });
    owned.retain(|_, w| w.strong_count() > 0);
    owned.insert(key, Arc::downgrade(&owner));
    Ok(owner)
}

/// A change to a SQLite file that the gateways of this process follow (SQLite has no
/// `LISTEN`, and no other process writes the file, so an in-process signal is all they need).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// A tenant's bundle pointer moved (a promotion or rollback).
    BundlePointers,
}

type Signals = HashMap<(PathBuf, Change), tokio::sync::watch::Sender<u64>>;

/// The signal of `change` to the SQLite file `db` in this process: every gateway on the file
/// subscribes to the same one. `None` when the file cannot be resolved (then only the
/// follower's slow fallback poll applies).
pub fn signal(db: &Path, change: Change) -> Option<tokio::sync::watch::Sender<u64>> {
    static SIGNALS: OnceLock<Mutex<Signals>> = OnceLock::new();
    let key = std::fs::canonicalize(db).ok()?;
    let mut signals = SIGNALS.get_or_init(Mutex::default).lock().ok()?;
    let sender = signals
        .entry((key, change))
        .or_insert_with(|| tokio::sync::watch::channel(0).0);
    Some(sender.clone())
}

/// Tells the gateways of this process on `db` that `change` happened.
pub fn ring(db: &Path, change: Change) {
    if let Some(s) = signal(db, change) {
        s.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ring_wakes_every_subscriber_of_that_file_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (x, y) = (dir.path().join("x.db"), dir.path().join("y.db"));
        std::fs::write(&x, b"").expect("x");
        std::fs::write(&y, b"").expect("y");
        let sub = |p: &Path| {
            signal(p, Change::BundlePointers)
                .expect("signal")
                .subscribe()
        };
        let (mut a, mut b) = (sub(&x), sub(&dir.path().join(".").join("x.db")));
        let other = sub(&y);
        ring(&x, Change::BundlePointers);
        a.changed().await.expect("a woken");
        b.changed()
            .await
            .expect("b woken: the same file by another spelling");
        assert!(
            !other.has_changed().expect("open"),
            "another file is not rung"
        );
    }

    #[test]
    fn one_process_shares_and_a_dropped_owner_releases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("x.db");
        let a = own(&db).expect("first");
        // Another spelling of the same file, in the same process: shared.
        let other = dir.path().join(".").join("x.db");
        let b = own(&other).expect("shared in this process");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(
            std::fs::read_to_string(lock_path(&db)).expect("pid").trim(),
            std::process::id().to_string()
        );
        // The lock itself is held: another open file description cannot take it.
        let probe = File::open(lock_path(&db)).expect("open");
        assert!(matches!(probe.try_lock(), Err(TryLockError::WouldBlock)));
        drop((a, b));
        probe.try_lock().expect("released with the last owner");
        probe.unlock().expect("unlock");
        let again = own(&db).expect("owned again");
        drop(again);
    }

    /// A database reached through a symbolic link is the same database: one lock, beside the
    /// file itself (two locks, one per name, let two processes own it).
    #[test]
    fn a_link_to_an_owned_file_is_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("dir");
        let db = real.join("gw.db");
        std::fs::write(&db, b"").expect("db");
        let link = dir.path().join("gw.db");
        std::os::unix::fs::symlink(&db, &link).expect("symlink");
        let a = own(&db).expect("first");
        let b = own(&link).expect("shared");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!lock_path(&link).exists(), "no second lock beside the link");
    }
}
