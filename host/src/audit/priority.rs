//! The audit writer thread's scheduling priority: its nice value, lowered at start when
//! `INTENTGATE_AUDIT_WRITER_NICE` asks for it (by default it keeps the process's).
//!
//! What it trades (measured in `BENCHMARKS.md`, session 14): on a saturated gateway the writer,
//! woken at every commit, preempts a runtime thread in the middle of a request, so commits stay
//! small and each call pays a share of a commit's fixed cost and of the cache it evicts. At nice
//! 8 the writer runs when a runtime thread parks instead, commits grow by themselves (no timer)
//! and the gateway spends 10-15 % less CPU a call at the same throughput. But with one call in
//! flight the writer is then no longer run ahead of the thread that woke it, and that call waits
//! 5-10 % longer. So the default keeps the process's priority; a gateway that is busy most of
//! the time (or shares its cores) may choose the lower one.
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

#[cfg(test)]
mod tests {
    use super::*;

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
