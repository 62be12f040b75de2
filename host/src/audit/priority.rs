//! The audit writer thread's scheduling: its class (Linux's `SCHED_BATCH` by default) and its
//! nice value (by default the process's).
//!
//! What it trades (measured in `BENCHMARKS.md`, session 14): on a saturated gateway the writer,
//! woken at every commit, preempts a runtime thread in the middle of a request, so commits stay
//! small and each call pays a share of a commit's fixed cost and of the cache it evicts.
//! - In `SCHED_BATCH` (`INTENTGATE_AUDIT_WRITER_BATCH`, on by default) a wake-up no longer
//!   preempts: the writer runs on an idle core at once, or when a runtime thread parks or its
//!   slice ends. Its share of the CPU is unchanged. Saturated, the gateway made 16 % more calls
//!   a second for 20 % less CPU a call (means of eight interleaved pairs); one call in flight
//!   (the other core idle) was not slower.
//! - A nice value above the process's (`INTENTGATE_AUDIT_WRITER_NICE`) also shrinks the
//!   writer's share: 7-23 % more calls a second saturated, but one call in flight waits about
//!   9 % longer, so it stays opt-in.
//!
//! This module must never raise a priority (that needs a privilege and would take the CPU from
//! the request path) and never stop the writer: a refused change is logged and ignored.

use std::io;

/// The highest nice value Linux allows (the lowest priority).
pub const MAX_NICE: u8 = 19;

/// Lowers the calling thread's priority to `nice` (0 leaves it as it is). A thread already
/// running at a lower priority keeps it. Returns the nice value the thread runs at.
pub fn lower_current_thread(nice: u8) -> io::Result<i32> {
    let current = rustix::process::getpriority_process(None)?;
    let wanted = i32::from(nice.min(MAX_NICE));
    if nice == 0 || wanted <= current {
        return Ok(current);
    }
    // On Linux, `PRIO_PROCESS` with no pid names the calling thread, not the whole process.
    rustix::process::setpriority_process(None, wanted)?;
    Ok(wanted)
}

/// Puts the calling thread in Linux's `SCHED_BATCH` class at its nice value: its wake-ups stop
/// preempting the thread running on the core. Elsewhere it changes nothing and says so.
#[cfg(target_os = "linux")]
pub fn batch_current_thread() -> io::Result<()> {
    // Moving between the normal and the batch class needs no privilege; `sched_priority` must
    // be 0 for both. Pid 0 names the calling thread.
    let param = uapi::c::sched_param { sched_priority: 0 };
    uapi::sched_setscheduler(0, uapi::c::SCHED_BATCH, &param)
        .map(drop)
        .map_err(|e| io::Error::from_raw_os_error(e.0))
}

/// Puts the calling thread in Linux's `SCHED_BATCH` class; elsewhere it changes nothing and
/// says so.
#[cfg(not(target_os = "linux"))]
pub fn batch_current_thread() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SCHED_BATCH is Linux's",
    ))
}

/// A thread's name, nice value and scheduling policy (3 is `SCHED_BATCH`), read from its
/// `/proc/.../stat`.
#[cfg(test)]
pub(crate) fn scheduling_of(stat_file: &std::path::Path) -> Option<(String, i32, u32)> {
    let stat = std::fs::read_to_string(stat_file).ok()?;
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
    // After the name the state is field 3: nice is field 19, the policy field 41.
    let fields: Vec<&str> = rest.split(' ').collect();
    Some((
        name.to_owned(),
        fields.get(16)?.parse().ok()?,
        fields.get(38)?.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHED_BATCH: u32 = 3;

    fn own() -> (String, i32, u32) {
        scheduling_of(std::path::Path::new("/proc/thread-self/stat")).expect("own stat")
    }

    /// Only the calling thread changes class, and keeps its nice value.
    #[test]
    fn batches_the_calling_thread_only() {
        let (_, nice, policy) = own();
        assert_ne!(
            policy, SCHED_BATCH,
            "the test thread starts in the normal class"
        );
        let (before, after) = std::thread::spawn(|| {
            let before = own();
            batch_current_thread().expect("batch");
            (before, own())
        })
        .join()
        .expect("thread");
        assert_eq!(before.2, policy);
        assert_eq!(after.2, SCHED_BATCH);
        assert_eq!(after.1, before.1, "the class change moved the nice value");
        let (_, nice_after, policy_after) = own();
        assert_eq!(
            (nice_after, policy_after),
            (nice, policy),
            "the test thread moved"
        );
    }

    /// Only the calling thread moves, and never up.
    #[test]
    fn lowers_the_calling_thread_only_and_never_raises() {
        let before = rustix::process::getpriority_process(None).expect("own nice");
        let (lowered, again, back) = std::thread::spawn(|| {
            let lowered = lower_current_thread(7).expect("lower");
            let again = lower_current_thread(3).expect("lower");
            let back = lower_current_thread(0).expect("keep");
            (lowered, again, back)
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, before.max(7));
        assert_eq!(
            again, lowered,
            "a lower nice value would raise the priority"
        );
        assert_eq!(back, lowered);
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own nice"),
            before
        );
    }
}
