//! The agent binary (`dcv-broker-agent`) as a child process, driving the
//! fake `dcv` of tests/fixtures: its configuration, state directory, tags
//! and the fake's state live in one temporary directory that outlives the
//! process, so a test can kill the agent and start it again on the same
//! state. Log lines are delivered as they come, as for the broker.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use super::process::{LogLines, PATIENCE, signal_pid};

/// The agent binary cargo built for these tests.
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_dcv-broker-agent");

/// The fake `dcv` executable (Python 3, stdlib only).
pub const FAKE_DCV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-dcv");

/// How often a test looks again at a file the fake writes.
const POLL: Duration = Duration::from_millis(50);

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything an agent runs on, kept across its restarts: `agent.conf`,
/// `state/` (its server id and journal), `tags/`, `init/`, and `dcv/`
/// (the fake dcv's sessions, calls.log and switches).
pub struct AgentHome {
    dir: TempDir,
}

impl AgentHome {
    /// A home whose agent talks to `broker_url` (`http://127.0.0.1:PORT`),
    /// with `extra` appended to the `[agent]` section (`key = value`
    /// lines: `max_virtual_sessions = 4`, `dcv_command_timeout = 1`, ...).
    pub fn new(broker_url: &str, extra: &str) -> AgentHome {
        let home = AgentHome {
            dir: TempDir::new("dcv-broker-agent-e2e"),
        };
        for sub in ["tags", "init", "dcv"] {
            std::fs::create_dir_all(home.path().join(sub)).expect("a directory");
        }
        home.write_config(broker_url, extra);
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("agent.conf")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn tags_folder(&self) -> PathBuf {
        self.path().join("tags")
    }

    pub fn init_folder(&self) -> PathBuf {
        self.path().join("init")
    }

    /// The fake dcv's `$FAKE_DCV_STATE`.
    pub fn fake_state(&self) -> PathBuf {
        self.path().join("dcv")
    }

    /// (Re)writes `agent.conf`: the test's paths, `broker_url`, a short
    /// reconnect cap so that restarts are quick and room for 4 virtual
    /// sessions (unless `extra` sets them), and `extra`.
    pub fn write_config(&self, broker_url: &str, extra: &str) {
        let default = |key: &str, line: &'static str| if extra.contains(key) { "" } else { line };
        let reconnect = default("reconnect_max_delay", "reconnect_max_delay = 1\n");
        // A known room for virtual sessions, whatever the agent's default.
        let room = default("max_virtual_sessions", "max_virtual_sessions = 4\n");
        let config = format!(
            "version = '0.1'\n\n[agent]\nbroker_url = '{broker_url}'\nstate_dir = '{state}'\n\
             tags_folder = '{tags}'\ninit_folder = '{init}'\ndcv_command = '{dcv}'\n\
             {reconnect}{room}{extra}\n\n[log]\nlevel = 'info'\n",
            state = self.state_dir().display(),
            tags = self.tags_folder().display(),
            init = self.init_folder().display(),
            dcv = FAKE_DCV,
        );
        std::fs::write(self.config_path(), config).expect("agent.conf written");
    }

    /// Writes `tags/<name>` with `content` (TOML `key = "value"` lines).
    pub fn tag_file(&self, name: &str, content: &str) {
        std::fs::write(self.tags_folder().join(name), content).expect("a tag file");
    }

    /// Creates the fake's switch file `name` (`hang-create-session`,
    /// `fail-create-session`, ...) with `content`.
    pub fn switch_on(&self, name: &str, content: &str) {
        std::fs::write(self.fake_state().join(name), content).expect("a switch file");
    }

    /// Removes the fake's switch file `name` (a hung command returns).
    pub fn switch_off(&self, name: &str) {
        let _ = std::fs::remove_file(self.fake_state().join(name));
    }

    /// Every `dcv` invocation so far, argv without argv[0].
    pub fn calls(&self) -> Vec<Vec<String>> {
        let Ok(log) = std::fs::read_to_string(self.fake_state().join("calls.log")) else {
            return Vec::new();
        };
        log.lines()
            // The fake writes a line in one call; a line being written
            // is only ever the last, and is skipped until complete.
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The invocations of `dcv <command>`.
    pub fn calls_of(&self, command: &str) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|argv| argv.first().map(String::as_str) == Some(command))
            .collect()
    }

    /// Waits (bounded) for an invocation of `dcv` that `matches`.
    pub async fn call_where(&self, what: &str, matches: impl Fn(&[String]) -> bool) -> Vec<String> {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(argv) = self.calls().into_iter().find(|argv| matches(argv)) {
                    return argv;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no dcv call {what}; calls: {:#?}", self.calls()))
    }

    /// The fake's session file for `id`.
    pub fn session_file(&self, id: &str) -> PathBuf {
        self.fake_state()
            .join("sessions")
            .join(format!("{id}.json"))
    }

    /// The fake's record of session `id`, as describe-session prints it.
    pub fn fake_session(&self, id: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.session_file(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Rewrites the fake's record of session `id` through `change`
    /// (atomically, so the agent never reads half a file).
    pub fn edit_session(&self, id: &str, change: impl FnOnce(&mut serde_json::Value)) {
        let mut session = self.fake_session(id).expect("the fake has the session");
        change(&mut session);
        let tmp = self.session_file(id).with_extension("json.edit");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&session).unwrap()).unwrap();
        std::fs::rename(tmp, self.session_file(id)).unwrap();
    }

    /// `dcv-broker-agent ARGS --config <this home's config>`, run to the
    /// end (bounded); its output.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        run_agent(args, Some(&self.config_path()), &self.fake_state()).await
    }
}

/// Runs the agent binary with `args` (and `--config config`) to its end,
/// bounded by [`PATIENCE`]; the child is killed if it outlives that.
pub async fn run_agent(
    args: &[&str],
    config: Option<&Path>,
    fake_state: &Path,
) -> std::process::Output {
    let mut command = tokio::process::Command::new(AGENT_BIN);
    command.args(args);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .env("FAKE_DCV_STATE", fake_state)
        .env_remove("DCV_BROKER_AGENT_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("the agent command ends")
        .expect("the agent binary runs")
}

/// A running agent binary.
pub struct AgentProcess {
    pub child: tokio::process::Child,
    log: LogLines,
}

impl AgentProcess {
    /// Starts the agent on `home`'s configuration, with the fake dcv's
    /// state in its environment. Does not wait for anything: tests wait
    /// for the log line they need (`registered server_id=`, ...).
    pub fn start(home: &AgentHome) -> AgentProcess {
        AgentProcess::start_with_env(home, &[])
    }

    /// [`start`](Self::start) with `env` besides (`NOTIFY_SOCKET`, ...).
    pub fn start_with_env(home: &AgentHome, env: &[(&str, &std::ffi::OsStr)]) -> AgentProcess {
        let mut child = tokio::process::Command::new(AGENT_BIN)
            .arg("--config")
            .arg(home.config_path())
            .env("FAKE_DCV_STATE", home.fake_state())
            .envs(env.iter().copied())
            .env_remove("DCV_BROKER_AGENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the agent binary starts");
        let log = LogLines::pipe(child.stderr.take());
        AgentProcess { child, log }
    }

    /// Starts the agent and waits until it has registered; returns the
    /// server id it registered as.
    pub async fn start_registered(home: &AgentHome) -> (AgentProcess, String) {
        let mut agent = AgentProcess::start(home);
        let id = agent.registered().await;
        (agent, id)
    }

    /// Waits for the next `registered server_id=<ID>` line; returns ID.
    pub async fn registered(&mut self) -> String {
        let line = self.logged("registered server_id=").await;
        let rest =
            &line[line.find("registered server_id=").unwrap() + "registered server_id=".len()..];
        rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The agent's process id.
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

    /// Sends `name` (`-TERM`, `-KILL`, ...) to the agent, by PID.
    pub fn signal(&self, name: &str) {
        signal_pid(self.pid(), name);
    }

    /// Waits for the process to exit; returns its status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the agent exits")
            .expect("wait works")
    }

    /// SIGKILL, and waits until it is gone: no goodbye to the broker, no
    /// flush of anything.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        self.exited().await;
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub async fn terminate(mut self) {
        self.signal("-TERM");
        let status = self.exited().await;
        assert_eq!(status.code(), Some(0), "the agent stops cleanly on SIGTERM");
    }
}
