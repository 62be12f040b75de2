//! Servers under test run in child processes (this binary re-executed with a `serve-*`
//! subcommand), each with its own tokio runtime and an explicit worker count, so that load
//! generation and serving never share a scheduler. A child prints `READY <addr>` on stdout once
//! it accepts connections and exits when its stdin closes (so it cannot outlive the bench).
//!
//! Also here: CPU accounting from `/proc` (per process and machine-wide), so the report can say
//! how much CPU each call cost and how busy the machine was with other work.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server child.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Server {
    /// Starts `current_exe args…` (optionally under `taskset -c cpus`) and waits for `READY`.
    pub fn spawn(name: &str, args: &[String], cpus: Option<&str>) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = match cpus {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c).arg(&exe);
                cmd
            }
            None => Command::new(&exe),
        };
        // The children get their settings from flags only, never from a stray INTENTGATE_* variable.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("INTENTGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Some(Ok(l))) => l,
            Ok(_) => {
                let _ = child.kill();
                return Err(format!(
                    "{name} exited before it was ready (see its stderr above)"
                ));
            }
            Err(_) => {
                let _ = child.kill();
                return Err(format!("{name} not ready after 120 s"));
            }
        };
        let addr = line
            .strip_prefix("READY ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| format!("{name}: unexpected first line {line:?}"))?;
        let stdin = child.stdin.take();
        Ok(Server { addr, child, stdin })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin asks the child to stop; give it a moment to drain, then make sure.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints `READY addr` and returns a future that resolves when stdin closes (the parent went
/// away or asked us to stop). Call from inside the child's runtime.
pub async fn ready_then_wait_for_stdin_eof(addr: SocketAddr) {
    use tokio::io::AsyncReadExt;
    println!("READY {addr}");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Clock ticks per second of `/proc/*/stat` times. 100 on every Linux we run on (USER_HZ).
const CLK_TCK: f64 = 100.0;

/// User + system CPU seconds a process used so far (all its threads, dead ones included).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds of every process whose command is `comm` (e.g. all PostgreSQL backends).
pub fn cpu_secs_by_comm(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let c = stat
            .find('(')
            .zip(stat.rfind(')'))
            .map(|(a, b)| &stat[a + 1..b]);
        if c == Some(comm) {
            total += parse_stat_cpu(&stat).unwrap_or(0.0);
        }
    }
    total
}

/// Machine-wide busy and total CPU seconds (from `/proc/stat`, all cores).
pub fn machine_cpu_secs() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user.
    let idle = v[3] + v[4];
    let total: f64 = v.iter().take(8).sum();
    Some(((total - idle) / CLK_TCK, total / CLK_TCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_fields() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
    }
}
