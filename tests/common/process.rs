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

/// The leader lease the cluster tests give their replicas: short, so that a
/// failover takes about a second (the broker refuses less than 500 ms).
pub const TEST_LEASE: &str = "1s";

/// How long one health check may take before the replica counts as not
/// answering (a stopped process never answers).
const HEALTH_PATIENCE: Duration = Duration::from_millis(500);

/// The health service a replica reports SERVING only while it leads.
pub const LEADER_HEALTH: &str = "dcv-broker.leader";
/// The health service a replica reports SERVING while it can take a write
/// (it leads, or it follows a leader it can forward to).
pub const WRITES_HEALTH: &str = "dcv-broker.writes";

/// One broker of a cluster on a shared PostgreSQL database: the binary
/// with `--database-url`, a node id of its own, the test lease, plaintext
/// on loopback without authentication, and a data directory of its own
/// (which holds only its admin socket). It can be killed and started again
/// on the same address, where clients' lazy channels find it again.
pub struct Replica {
    pub node: String,
    pub addr: SocketAddr,
    /// The running process; `None` between a kill and a restart.
    pub process: Option<BrokerProcess>,
    /// A lazily connected channel to `addr` (reconnects after a restart).
    channel: tonic::transport::Channel,
    url: String,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl Replica {
    /// Starts a replica on a fresh loopback port, with `extra` flags.
    pub async fn start(url: &str, node: &str, extra: &[&str]) -> Replica {
        let dir = std::env::temp_dir().join(format!(
            "dcv-broker-replica-{}-{node}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("create the replica's data directory");
        let mut replica = Replica {
            node: node.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            process: None,
            channel: lazy_channel(SocketAddr::from(([127, 0, 0, 1], 1))),
            url: url.to_string(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let process = BrokerProcess::start_exactly(&replica.args()).await;
        replica.addr = process.addr;
        replica.channel = lazy_channel(process.addr);
        replica.process = Some(process);
        replica
    }

    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = [
            "--database-url",
            self.url.as_str(),
            "--node-id",
            self.node.as_str(),
            "--leader-lease",
            TEST_LEASE,
            "--auth",
            "off",
            // Every test client comes from 127.0.0.1: one client to the
            // rate limit, which would refuse the load the tests make.
            "--client-rate",
            "0",
            "--log",
            "info",
            "--data-dir",
        ]
        .iter()
        .map(|s| std::ffi::OsString::from(*s))
        .collect();
        args.push(self.dir.clone().into_os_string());
        args.extend(self.extra.iter().map(std::ffi::OsString::from));
        args
    }

    /// Starts the replica again, after [`kill`](Self::kill), on the same
    /// address, node id and flags.
    pub async fn restart(&mut self) {
        assert!(self.process.is_none(), "{} is still running", self.node);
        self.process = Some(BrokerProcess::start_on(self.addr, &self.args()).await);
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        let mut process = self.process.take().expect("the replica runs");
        process.signal("-KILL");
        process.exited().await;
    }

    /// SIGTERM, and a graceful exit.
    pub async fn terminate(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate().await;
        }
    }

    /// The running process.
    pub fn process(&mut self) -> &mut BrokerProcess {
        self.process.as_mut().expect("the replica runs")
    }

    /// Sends `name` (`-STOP`, `-CONT`, ...) to the replica, by PID.
    pub fn signal(&self, name: &str) {
        self.process
            .as_ref()
            .expect("the replica runs")
            .signal(name);
    }

    /// Waits for a log line containing `text`; returns it.
    pub async fn logged(&mut self, text: &str) -> String {
        self.process().logged(text).await
    }

    /// A channel to the replica, connected on first use, reconnecting
    /// after a restart on the same address.
    pub fn channel(&self) -> tonic::transport::Channel {
        self.channel.clone()
    }

    /// `service`'s gRPC health status, or `None` when the replica does
    /// not answer within a short deadline (stopped, killed, starting) or
    /// does not know the service.
    pub async fn health(
        &self,
        service: &str,
    ) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let mut client = HealthClient::new(self.channel());
        let reply = tokio::time::timeout(
            HEALTH_PATIENCE,
            client.check(HealthCheckRequest {
                service: service.to_string(),
            }),
        )
        .await
        .ok()?
        .ok()?;
        ServingStatus::try_from(reply.into_inner().status).ok()
    }

    /// Whether the replica says it leads (`dcv-broker.leader` SERVING).
    pub async fn is_leader(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        self.health(LEADER_HEALTH).await == Some(ServingStatus::Serving)
    }

    /// Whether the replica says it follows a leader: it answers, does not
    /// lead, and takes writes (forwarding them).
    pub async fn is_follower(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        self.health(LEADER_HEALTH).await == Some(ServingStatus::NotServing)
            && self.health(WRITES_HEALTH).await == Some(ServingStatus::Serving)
    }

    /// Polls health until the replica follows a leader, within `patience`.
    pub async fn wait_following(&self, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        while !self.is_follower().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not become a follower within {patience:?} (leader: {:?}, writes: {:?})",
                self.node,
                self.health(LEADER_HEALTH).await,
                self.health(WRITES_HEALTH).await,
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // The process goes with its handle (kill_on_drop); reap it so no
        // zombie outlives the test.
        if let Some(mut process) = self.process.take() {
            let _ = process.child.start_kill();
            let _ = process.child.try_wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A channel to `addr`, connected on first use, with bounded connect and
/// call times so that a stopped or killed replica fails calls instead of
/// hanging them.
fn lazy_channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// Polls the replicas' health until exactly one of those running leads;
/// returns its index. Panics after `patience`.
pub async fn wait_for_leader(replicas: &[Replica], patience: Duration) -> usize {
    wait_for_leader_among(replicas, &(0..replicas.len()).collect::<Vec<_>>(), patience).await
}

/// [`wait_for_leader`] among the replicas at `candidates` only (the others
/// are stopped or killed, and not asked).
pub async fn wait_for_leader_among(
    replicas: &[Replica],
    candidates: &[usize],
    patience: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut leaders = Vec::new();
        for &i in candidates {
            if replicas[i].process.is_some() && replicas[i].is_leader().await {
                leaders.push(i);
            }
        }
        match leaders.as_slice() {
            [one] => return *one,
            many => assert!(
                tokio::time::Instant::now() < deadline,
                "no single leader among {candidates:?} within {patience:?}: {many:?} say they lead"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
