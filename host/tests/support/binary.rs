//! The gateway binary as a child process (`INTENTGATE_LOG_FORMAT=json`): its output lines
//! collected as they come, and the URL it listens on read from its `listening` log line.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Collects the lines of `out` (a child's stdout or stderr) on a thread, as they are written.
pub fn collect_lines(out: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    collect_all_lines(out).0
}

/// [`collect_lines`], with the reader thread, for [`lines_at_end`].
pub fn collect_all_lines(
    out: impl std::io::Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines").push(line);
        }
    });
    (lines, reader)
}

/// Every line of a child that has exited and been reaped: its pipe ends then (the gateway
/// starts no process that could hold it open), so waiting for the reader to see that end
/// leaves no line written before the exit unread, whereas a fixed sleep can on a loaded
/// machine. Panics if the output does not end within 30 s.
pub fn lines_at_end(
    lines: &Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
) -> Vec<String> {
    let started = Instant::now();
    while !reader.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the child's output did not end: {:?}",
            lines.lock().expect("lines")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.join().expect("the reader thread");
    lines.lock().expect("lines").clone()
}

/// The `http://ADDR` the child logged as its listening address. `Err` (with the lines seen)
/// when it exited first or did not listen within 120 s; the child is then killed and reaped.
pub async fn listening_url(
    child: &mut Child,
    lines: &Arc<Mutex<Vec<String>>>,
) -> Result<String, String> {
    let started = Instant::now();
    loop {
        let found = lines.lock().expect("lines").iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["fields"]["local"].as_str().map(|a| format!("http://{a}"))
        });
        if let Some(url) = found {
            return Ok(url);
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "no listening line (exit: {exited:?}); stdout: {:?}",
                lines.lock().expect("lines")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway binary serving the demo upstream on `data`, with the tests' admin token and
/// master key and nothing else from this environment; the caller adds its own settings and
/// stdio, then spawns.
pub fn demo_gateway(data: &std::path::Path) -> std::process::Command {
    use crate::support::gateway::{ADMIN_TOKEN, MASTER_KEY};
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_intentgate"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INTENTGATE_ADDR", "127.0.0.1:0")
        .env("INTENTGATE_DATA_DIR", data)
        .env("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("INTENTGATE_MASTER_KEY", MASTER_KEY)
        .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
        .arg("serve")
        .arg("--demo")
        .stdin(std::process::Stdio::null());
    cmd
}
