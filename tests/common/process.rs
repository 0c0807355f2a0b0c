//! The broker binary as a child process: started on 127.0.0.1:0, its
//! announced address parsed, its log lines delivered as they come, and
//! signals sent to it by PID. Tests of the real binary (attacks, shutdown,
//! TLS, the store's files) start it through this, not a copy of their own.

use std::{ffi::OsStr, net::SocketAddr, process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, BufReader};

/// The broker binary cargo built for these tests.
pub const BROKER_BIN: &str = env!("CARGO_BIN_EXE_dcv-broker");

/// How long a test waits for the binary to announce itself or log a line.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A running broker binary.
pub struct BrokerProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl BrokerProcess {
    /// Starts the binary listening on 127.0.0.1:0, in memory, with a demo
    /// fleet of 3 servers, plus `args`. Clap refuses a flag given twice: to
    /// change one of these, use [`BrokerProcess::start_exactly`].
    pub async fn start<S: AsRef<OsStr>>(args: &[S]) -> BrokerProcess {
        let mut all: Vec<&OsStr> = ["--in-memory", "--demo-fleet", "3"]
            .iter()
            .map(OsStr::new)
            .collect();
        all.extend(args.iter().map(AsRef::as_ref));
        BrokerProcess::start_exactly(&all).await
    }

    /// Starts the binary listening on 127.0.0.1:0 with exactly `args`
    /// besides `--listen`.
    pub async fn start_exactly<S: AsRef<OsStr>>(args: &[S]) -> BrokerProcess {
        BrokerProcess::spawn(BrokerProcess::command(args)).await
    }

    /// [`start_exactly`](Self::start_exactly), with the broker's log
    /// written to `log` rather than delivered to [`logged`](Self::logged):
    /// for a test that reads the whole log at a moment it picks (a line
    /// written before a reply is then surely there), not as lines come.
    pub async fn start_exactly_logging_to<S: AsRef<OsStr>>(
        args: &[S],
        log: std::fs::File,
    ) -> BrokerProcess {
        let mut command = BrokerProcess::command(args);
        command.stderr(log);
        BrokerProcess::launch(command).await
    }

    /// The binary with `args`, listening on 127.0.0.1:0, and without a
    /// shutdown grace period unless `args` set one (an environment
    /// default, which a flag overrides), so that SIGTERM drains at once.
    fn command<S: AsRef<OsStr>>(args: &[S]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BROKER_BIN);
        command
            .env("DCV_BROKER_SHUTDOWN_GRACE", "0s")
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        command
    }

    /// Spawns `command` (the broker binary, with every flag it needs,
    /// `--listen` included) and waits for its address.
    pub async fn spawn(mut command: tokio::process::Command) -> BrokerProcess {
        command.stderr(Stdio::piped());
        BrokerProcess::launch(command).await
    }

    /// Spawns `command`, its stderr where the caller put it (delivered as
    /// log lines when piped), and waits for its address.
    async fn launch(mut command: tokio::process::Command) -> BrokerProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the broker binary starts");
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        if let Some(stderr) = child.stderr.take() {
            let mut stderr = BufReader::new(stderr).lines();
            tokio::spawn(async move {
                while let Ok(Some(line)) = stderr.next_line().await {
                    let _ = tx.send(line);
                }
            });
        }
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = tokio::time::timeout(PATIENCE, stdout.next_line())
            .await
            .expect("the broker announces its port")
            .expect("stdout is readable");
        let Some(line) = line else {
            let mut log = log;
            let mut lines = Vec::new();
            while let Ok(line) = log.try_recv() {
                lines.push(line);
            }
            panic!("the broker exited before listening; stderr: {lines:#?}");
        };
        let addr = line
            .strip_prefix("dcv-broker listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        BrokerProcess { child, addr, log }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Waits for a log line containing `text`; returns it.
    pub async fn logged(&mut self, text: &str) -> String {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.log.recv().await.expect("log ended");
                if line.contains(text) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {text:?}"))
    }

    /// Every log line up to and including the first containing `text`.
    pub async fn lines_until(&mut self, text: &str) -> Vec<String> {
        let mut lines = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            loop {
                let line = self.log.recv().await.expect("log ended");
                let done = line.contains(text);
                lines.push(line);
                if done {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {text:?} in {lines:#?}"));
        lines
    }

    /// Every log line received so far, without waiting.
    pub fn drain_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// Sends `name` (`-TERM`, `-HUP`, ...) to the broker, by PID.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([name, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit on its own; returns its status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the broker exits")
            .expect("wait works")
    }

    /// SIGTERM, then waits for a graceful exit (status 0).
    pub async fn terminate(mut self) {
        self.signal("-TERM");
        let status = self.exited().await;
        assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    }
}
