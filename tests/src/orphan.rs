//! An agent binary started under a throwaway parent shell, with `SYSTEMVM_PARENT_PID` set to the
//! shell's pid as core's process driver sets its own: ending the shell orphans the agent, as a
//! dying core would.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The agent and the shell it runs under.
pub struct UnderShell {
    /// The agent's pid.
    pub pid: u32,
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl UnderShell {
    /// Starts `bin args…` in the background of `sh`, its output appended to `log`; the shell lives
    /// until [`UnderShell::end_parent`].
    pub fn start(bin: &Path, args: &[&str], log: &Path) -> std::io::Result<UnderShell> {
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(r#"log=$1; shift; SYSTEMVM_PARENT_PID=$$ "$@" >>"$log" 2>&1 </dev/null & echo $!; read _ignored"#)
            .arg("sh")
            .arg(log)
            .arg(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = shell
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let pid = line
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("the shell printed {line:?}, not a pid")))?;
        let stdin = shell.stdin.take();
        Ok(UnderShell { pid, shell, stdin })
    }

    /// Whether the agent runs (exists and is not a zombie).
    pub fn agent_running(&self) -> bool {
        running(self.pid)
    }

    /// Ends the shell (the agent's parent) and waits for it.
    pub fn end_parent(&mut self) -> std::io::Result<()> {
        drop(self.stdin.take());
        self.shell.wait().map(|_| ())
    }

    /// Waits up to `within` for the agent to end; whether it did.
    pub fn wait_agent_gone(&self, within: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < within {
            if !self.agent_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.agent_running()
    }
}

impl Drop for UnderShell {
    fn drop(&mut self) {
        if self.agent_running() {
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
        }
        let _ = self.end_parent();
    }
}

/// Whether `pid` exists and is not a zombie (an orphan's exit may never be reaped here).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
