//! Component processes: spawned so that they die with the process that owns them, logged to a
//! file, and stopped with SIGTERM followed by SIGKILL.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// One control plane program: its command line, log file and running process.
pub(super) struct Component {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    process: Mutex<Option<OwnedChild>>,
}

impl Component {
    pub(super) fn new(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        log_path: PathBuf,
    ) -> Self {
        Self {
            name,
            program,
            args,
            log_path,
            process: Mutex::new(None),
        }
    }

    pub(super) fn name(&self) -> &'static str {
        self.name
    }

    pub(super) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts the program with its output appended to the log file.
    pub(super) fn spawn(&self) -> anyhow::Result<()> {
        let mut process = self.lock();
        if let Some(child) = process.as_mut()
            && child.0.try_wait().ok().flatten().is_none()
        {
            bail!(
                "{} is already running (pid {}); stop it before starting it again",
                self.name,
                child.0.id()
            );
        }

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("failed to open the log file {}", self.log_path.display()))?;
        let command_line = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|part| part.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(log, "==== acrpull-testkit starts: {command_line}")
            .with_context(|| format!("failed to write {}", self.log_path.display()))?;

        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .context("failed to duplicate the log file handle")?,
            )
            .stderr(log)
            // A separate process group keeps a terminal's Ctrl-C away from the components, so
            // their owner decides the shutdown order.
            .process_group(0);
        let child = spawn_tied_to_this_process(command).with_context(|| {
            format!("failed to start {} ({})", self.name, self.program.display())
        })?;
        tracing::info!(
            component = self.name,
            pid = child.id(),
            log = %self.log_path.display(),
            "started control plane component"
        );
        *process = Some(OwnedChild(child));
        Ok(())
    }

    /// Returns the exit status if the process was started and has exited since.
    pub(super) fn exit_status(&self) -> Option<ExitStatus> {
        let mut process = self.lock();
        process
            .as_mut()
            .and_then(|child| child.0.try_wait().ok().flatten())
    }

    /// Returns whether the process was started and has not exited.
    #[cfg(test)]
    pub(super) fn is_running(&self) -> bool {
        let mut process = self.lock();
        process
            .as_mut()
            .is_some_and(|child| matches!(child.0.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then sends SIGKILL.
    ///
    /// Does nothing if the process was never started or was already stopped.
    pub(super) async fn stop(&self, grace: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.lock().take() else {
            return Ok(());
        };
        if child.0.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(child.0.id()).context("process id out of range")?;
        // SAFETY: `pid` is a child of this process that has not been reaped, so it cannot name
        // an unrelated process.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == -1 {
            let error = io::Error::last_os_error();
            tracing::warn!(
                component = self.name,
                pid,
                %error,
                "failed to send SIGTERM, sending SIGKILL"
            );
            return Ok(());
        }

        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match child.0.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(
                        component = self.name,
                        pid,
                        %status,
                        "stopped control plane component"
                    );
                    return Ok(());
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(error) => {
                    return Err(error).with_context(|| format!("failed to wait for {}", self.name));
                }
            }
        }
        tracing::warn!(
            component = self.name,
            pid,
            grace_seconds = grace.as_secs_f64(),
            "component did not exit after SIGTERM, sending SIGKILL"
        );
        // Dropping `child` sends SIGKILL and reaps the process.
        drop(child);
        Ok(())
    }

    /// Sends SIGKILL and reaps the process without blocking on the lock.
    ///
    /// This runs at process exit, where another thread may hold the lock forever. A process
    /// skipped here still gets SIGKILL from the kernel through its parent-death signal.
    pub(super) fn kill_now(&self) {
        if let Ok(mut process) = self.process.try_lock() {
            drop(process.take());
        }
    }

    /// Returns the last `max_lines` lines of the log file, for error messages.
    pub(super) fn log_tail(&self, max_lines: usize) -> String {
        let Ok(text) = fs::read_to_string(&self.log_path) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }

    /// Builds an error for a process that exited while it was expected to run.
    pub(super) fn exited_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow::anyhow!(
            "{} exited with {status}; see {}. Last log lines:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(20)
        )
    }

    fn lock(&self) -> MutexGuard<'_, Option<OwnedChild>> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A child process that gets SIGKILL and is reaped when dropped.
struct OwnedChild(Child);

impl Drop for OwnedChild {
    fn drop(&mut self) {
        // Errors mean the process was already reaped, so there is nothing left to clean up.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` so that the kernel sends the child SIGKILL when this process exits, even
/// if this process panics, is killed, or never drops the owner of the child.
///
/// The parent-death signal fires when the thread that forked the child exits, not the process.
/// Tests and Tokio's blocking pool run on short-lived threads, so one long-lived thread, which
/// ends only with the process, does every spawn.
fn spawn_tied_to_this_process(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();

    let parent_pid = std::process::id();
    // SAFETY: the hook calls only async-signal-safe functions (prctl, getppid) and does not
    // allocate, as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have exited before prctl ran, and then no signal would come.
            if u32::try_from(libc::getppid()).ok() != Some(parent_pid) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("control-plane-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in receiver {
                    // The requester may have stopped waiting, and then the result is unused.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("failed to start the thread that spawns control plane processes");
        sender
    });

    let (reply_sender, reply_receiver) = mpsc::channel();
    spawner
        .send((command, reply_sender))
        .map_err(|_| io::Error::other("the control plane spawner thread has exited"))?;
    reply_receiver
        .recv()
        .map_err(|_| io::Error::other("the control plane spawner thread has exited"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path) -> Component {
        Component::new(
            "sleep",
            PathBuf::from("/bin/sleep"),
            vec![OsString::from("300")],
            dir.join("sleep.log"),
        )
    }

    #[tokio::test]
    async fn component_stops_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let component = sleeper(dir.path());
        component.spawn().unwrap();
        assert!(component.is_running());
        assert!(
            component.spawn().is_err(),
            "a second spawn must be rejected"
        );

        component.stop(Duration::from_secs(5)).await.unwrap();
        assert!(!component.is_running());

        component.spawn().unwrap();
        assert!(component.is_running());
        component.kill_now();
        assert!(!component.is_running());

        let log = fs::read_to_string(component.log_path()).unwrap();
        assert_eq!(
            log.matches("==== acrpull-testkit starts: /bin/sleep 300")
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn component_reports_early_exit() {
        let dir = tempfile::tempdir().unwrap();
        let component = Component::new(
            "false",
            PathBuf::from("/bin/sh"),
            vec![
                OsString::from("-c"),
                OsString::from("echo broken flag; exit 3"),
            ],
            dir.path().join("false.log"),
        );
        component.spawn().unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = component.exit_status() {
                break status;
            }
            assert!(Instant::now() < deadline, "the process did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status.code(), Some(3));

        let message = component.exited_error(status).to_string();
        assert!(message.contains("broken flag"), "{message}");
        assert!(message.contains("false.log"), "{message}");
    }

    #[test]
    fn child_outlives_spawning_thread() {
        let dir = tempfile::tempdir().unwrap();
        let component = std::sync::Arc::new(sleeper(dir.path()));
        let spawning = std::sync::Arc::clone(&component);
        thread::spawn(move || spawning.spawn().unwrap())
            .join()
            .unwrap();

        // The parent-death signal would have killed the child here if the short-lived thread
        // had forked it.
        thread::sleep(Duration::from_millis(200));
        assert!(component.is_running());
        component.kill_now();
    }
}
