//! Independent servers the contract suites start for themselves: each on a free port, stopped
//! when dropped. `.ci/run` installs them; elsewhere a suite says how to install a missing one and
//! skips, unless `CALLISTO_REQUIRE_PEERS` is set, where a missing server fails the run.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

/// Where a peer's binary is: the environment variable `variable`, else `fallback()`.
fn locate(variable: &str, fallback: impl FnOnce() -> Option<String>, install: &str) -> Option<String> {
    let found = std::env::var(variable).ok().filter(|p| !p.trim().is_empty()).or_else(fallback);
    if found.is_none() {
        assert!(std::env::var_os("CALLISTO_REQUIRE_PEERS").is_none(), "{variable} is required here: {install}");
        let _ = writeln!(std::io::stderr(), "skipped: {install}, or set {variable}");
    }
    found
}

/// `osmem-server` (PyPI), an in-memory OpenSearch-compatible server.
pub struct Osmem {
    pub url: String,
    child: Child,
    /// Kept open: a server whose standard output is closed dies of SIGPIPE at its next line.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Osmem {
    /// Starts it on a free port; `None` (after one line saying why) when it is not installed.
    pub fn start() -> Option<Osmem> {
        let binary = locate(
            "CALLISTO_OSMEM_SERVER",
            || {
                // The wheel ships the binary inside the package; its own helper finds it.
                let output = Command::new("python3")
                    .args(["-c", "import osmem_server; print(osmem_server.resolve_binary())"])
                    .output()
                    .ok()?;
                output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            },
            "pip install osmem-server==0.1.6",
        )?;
        // It exits when its standard input closes, so it cannot outlive this process.
        let mut child = Command::new(&binary)
            .args(["-addr", "127.0.0.1:0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let announced: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("osmem-server announced {line:?}: {e}"));
        let url = announced["url"].as_str().expect("the announcement names the url").to_owned();
        Some(Osmem { url, child, _stdout: stdout })
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
