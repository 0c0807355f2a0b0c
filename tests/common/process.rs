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
    /// The agents' port, when started with `--agent-listen`.
    pub agent_addr: Option<SocketAddr>,
    log: LogLines,
}

/// A child's stderr, delivered line by line as the child writes it, so a
/// test waits for the line that says something happened instead of
/// sleeping. Shared by the broker's and the agent's process harnesses.
pub struct LogLines {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line received, for the message of a test that waited in vain.
    seen: Vec<String>,
}

impl LogLines {
    /// Reads `stream` line by line on a task of its own.
    pub fn pipe<R>(stream: Option<R>) -> LogLines
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(stream) = stream {
            let mut lines = BufReader::new(stream).lines();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = tx.send(line);
                }
            });
        }
        LogLines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`; returns it.
    pub async fn logged(&mut self, text: &str) -> String {
        let lines = self.lines_until(text).await;
        lines.into_iter().last().expect("the line waited for")
    }

    /// Every line up to and including the first containing `text`.
    pub async fn lines_until(&mut self, text: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.rx.recv().await {
                self.seen.push(line.clone());
                let done = line.contains(text);
                lines.push(line);
                if done {
                    return true;
                }
            }
            false
        })
        .await;
        match found {
            Ok(true) => lines,
            Ok(false) => panic!("the log ended without {text:?}; it was {:#?}", self.seen),
            Err(_) => panic!("no log line with {text:?} in {:#?}", self.seen),
        }
    }

    /// Every line received so far, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line.clone());
            lines.push(line);
        }
        lines
    }
}

/// Sends `name` (`-TERM`, `-KILL`, ...) to process `pid`.
pub fn signal_pid(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
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

    /// [`start_exactly`](Self::start_exactly) on `addr` instead of an
    /// ephemeral port: a broker restarted where its clients (agents) keep
    /// looking for it.
    pub async fn start_on<S: AsRef<OsStr>>(addr: SocketAddr, args: &[S]) -> BrokerProcess {
        BrokerProcess::spawn(BrokerProcess::command_on(addr, args)).await
    }

    /// The binary with `args`, listening on 127.0.0.1:0, and without a
    /// shutdown grace period unless `args` set one (an environment
    /// default, which a flag overrides), so that SIGTERM drains at once.
    fn command<S: AsRef<OsStr>>(args: &[S]) -> tokio::process::Command {
        BrokerProcess::command_on(SocketAddr::from(([127, 0, 0, 1], 0)), args)
    }

    fn command_on<S: AsRef<OsStr>>(addr: SocketAddr, args: &[S]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BROKER_BIN);
        command
            .env("DCV_BROKER_SHUTDOWN_GRACE", "0s")
            .args(["--listen", &addr.to_string()])
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
        let agent_port = command.as_std().get_args().any(|a| a == "--agent-listen");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the broker binary starts");
        let mut log = LogLines::pipe(child.stderr.take());
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = tokio::time::timeout(PATIENCE, stdout.next_line())
            .await
            .expect("the broker announces its port")
            .expect("stdout is readable");
        let Some(line) = line else {
            panic!(
                "the broker exited before listening; stderr: {:#?}",
                log.drain()
            );
        };
        let addr = line
            .strip_prefix("dcv-broker listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        let mut agent_addr = None;
        if agent_port {
            let line = tokio::time::timeout(PATIENCE, stdout.next_line())
                .await
                .expect("the broker announces its agents' port")
                .expect("stdout is readable")
                .unwrap_or_default();
            agent_addr = Some(
                line.strip_prefix("dcv-broker agents listening on ")
                    .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                    .parse()
                    .expect("an address"),
            );
        }
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        BrokerProcess {
            child,
            addr,
            agent_addr,
            log,
        }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Waits for a log line containing `text`; returns it.
    pub async fn logged(&mut self, text: &str) -> String {
        self.log.logged(text).await
    }

    /// Every log line up to and including the first containing `text`.
    pub async fn lines_until(&mut self, text: &str) -> Vec<String> {
        self.log.lines_until(text).await
    }

    /// Every log line received so far, without waiting.
    pub fn drain_log(&mut self) -> Vec<String> {
        self.log.drain()
    }

    /// Sends `name` (`-TERM`, `-HUP`, ...) to the broker, by PID.
    pub fn signal(&self, name: &str) {
        signal_pid(self.pid(), name);
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
