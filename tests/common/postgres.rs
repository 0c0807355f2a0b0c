//! A throwaway PostgreSQL for tests: [`TestDatabase::new`] gives each test
//! a fresh, empty database and its URL.
//!
//! Without `DCV_BROKER_TEST_DATABASE_URL`, each test gets its own server:
//! Debian's PostgreSQL binaries (`initdb` and `postgres` on `PATH`, else
//! the newest `/usr/lib/postgresql/*/bin`) initialise a cluster in a
//! temporary directory, and the server listens on 127.0.0.1 only, on a
//! free port, with trust authentication (nobody else can reach a loopback
//! port's cluster through a Unix socket in a private directory, and the
//! port is the test's alone) and `fsync` on, as in production. It runs as
//! a child process, is waited for by polling a connection (bounded), and
//! is stopped (SIGINT, PostgreSQL's fast shutdown, then wait) and its
//! directory removed when the value is dropped. A test may stop its server
//! (fast or immediate shutdown, the latter a crash that replays the WAL at
//! the next start) and start it again on the same port and data directory,
//! so that brokers see the same URL come back.
//!
//! PostgreSQL refuses to run as root; when the tests do (CI containers),
//! `initdb` and `postgres` run as `nobody` through `setpriv`.
//!
//! With `DCV_BROKER_TEST_DATABASE_URL=postgres://...`, that server is used
//! instead: each test creates a database of its own on it (and drops it
//! afterwards, best effort); it must be a `postgres://` URL whose user may
//! create databases. Nothing but loopback or that URL is contacted.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a server may take to accept its first connection.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a stopped server may take to exit before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// The pause between two connection attempts while the server starts.
const POLL: Duration = Duration::from_millis(20);
/// The uid and gid PostgreSQL runs as when the tests run as root.
const NOBODY: u32 = 65534;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh database for one test.
pub struct TestDatabase {
    /// Its URL (`postgres://...`), for the store or `--database-url`.
    pub url: String,
    server: Option<LocalServer>,
    /// On a shared server: the admin URL and the database to drop.
    shared: Option<(String, String)>,
}

impl TestDatabase {
    /// A fresh empty database: on `DCV_BROKER_TEST_DATABASE_URL`'s server
    /// if set, else on a server of its own.
    pub async fn new() -> TestDatabase {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("dcv_broker_test_{}_{n}", std::process::id());
        match std::env::var("DCV_BROKER_TEST_DATABASE_URL") {
            Ok(admin) if !admin.is_empty() => {
                execute(&admin, &format!("CREATE DATABASE {name}")).await;
                TestDatabase {
                    url: with_database(&admin, &name),
                    server: None,
                    shared: Some((admin, name)),
                }
            }
            _ => {
                let server = LocalServer::start(n).await;
                let admin = server.url("postgres");
                execute(&admin, &format!("CREATE DATABASE {name}")).await;
                TestDatabase {
                    url: server.url(&name),
                    server: Some(server),
                    shared: None,
                }
            }
        }
    }

    /// Whether this test owns its server (and so may stop it).
    pub fn owns_server(&self) -> bool {
        self.server.is_some()
    }

    /// Stops the test's own server (fast shutdown: open connections are
    /// cut), keeping its data. Panics on a shared server.
    pub fn stop_server(&mut self) {
        self.own_server().stop(Shutdown::Fast);
    }

    /// Stops the test's own server as a crash would (immediate shutdown:
    /// no checkpoint; the next start replays the WAL, so only what was
    /// fsynced survives). Panics on a shared server.
    pub fn crash_server(&mut self) {
        self.own_server().stop(Shutdown::Immediate);
    }

    /// Starts the test's own server again, stopped by
    /// [`stop_server`](Self::stop_server) or [`crash_server`](Self::crash_server),
    /// on the same port and data directory (the same URL), and waits until
    /// it accepts connections. Panics on a shared server, or if someone
    /// took the port meanwhile.
    pub async fn start_server(&mut self) {
        let server = self.own_server();
        let (bin, as_root) = (server.bin.clone(), server.as_root);
        assert!(
            server.launch(&bin, as_root).await,
            "PostgreSQL did not start again on port {}; its log: {}",
            server.port,
            std::fs::read_to_string(server.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// The process id of the test's own server while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server
            .as_ref()
            .and_then(|s| s.child.as_ref())
            .map(Child::id)
    }

    fn own_server(&mut self) -> &mut LocalServer {
        self.server
            .as_mut()
            .expect("only a test's own server can be stopped or started")
    }

    /// Runs `sql` on the test's database.
    pub async fn execute(&self, sql: &str) {
        execute(&self.url, sql).await;
    }

    /// A connection to the test's database, for checks.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.shared.take() {
            // Best effort, on a thread of its own: drop may run inside or
            // outside a runtime.
            let _ = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    if let Ok(client) = connect(&admin).await {
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn execute(url: &str, sql: &str) {
    let client = connect(url).await.expect("connect to PostgreSQL");
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// How a test's own server is stopped.
#[derive(Clone, Copy)]
enum Shutdown {
    /// SIGINT: connections cut, a checkpoint written, a clean exit.
    Fast,
    /// SIGQUIT: exit at once, as in a crash; recovery replays the WAL.
    Immediate,
}

/// A PostgreSQL server of the test's own.
struct LocalServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    bin: PathBuf,
    as_root: bool,
}

impl LocalServer {
    async fn start(n: u32) -> LocalServer {
        let bin = binaries();
        let dir = std::env::temp_dir().join(format!("dcv-broker-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the PostgreSQL test directory");
        let data = dir.join("data");
        let as_root = rustix::process::geteuid().is_root();
        if as_root {
            std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))
                .expect("give the PostgreSQL test directory to nobody");
        }
        let output = command(&bin.join("initdb"), as_root)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--pgdata")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut server = LocalServer {
            dir,
            port: 0,
            child: None,
            bin: bin.clone(),
            as_root,
        };
        // A free port can be taken by someone else between our probe and
        // the server's bind: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.launch(&bin, as_root).await {
                return server;
            }
        }
        panic!(
            "PostgreSQL did not start; its log: {}",
            std::fs::read_to_string(server.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// Starts `postgres` and waits until it accepts connections; false if
    /// it exited first (its port was taken, say).
    async fn launch(&mut self, bin: &Path, as_root: bool) -> bool {
        // Appended to: a restarted server's log follows the first run's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .expect("open the log");
        let child = command(&bin.join("postgres"), as_root)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "max_connections=40",
                "-c",
                "shared_buffers=16MB",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        let url = self.url("postgres");
        loop {
            if connect(&url).await.is_ok() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within {START_DEADLINE:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Shuts down as asked, then waits (killed if it takes too long).
    fn stop(&mut self, how: Shutdown) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let signal = match how {
            Shutdown::Fast => "-INT",
            Shutdown::Immediate => "-QUIT",
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(POLL),
            }
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop(Shutdown::Fast);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `program`, run as nobody when the tests run as root.
fn command(program: &Path, as_root: bool) -> Command {
    if as_root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid",
                &NOBODY.to_string(),
                "--regid",
                &NOBODY.to_string(),
                "--clear-groups",
                "--",
            ])
            .arg(program)
            // HOME of root is not nobody's to read.
            .env("HOME", "/");
        command
    } else {
        Command::new(program)
    }
}

/// The directory of `initdb` and `postgres`: `PATH`'s, else the newest
/// Debian install's.
fn binaries() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
    });
    if let Some(dir) = on_path {
        return dir;
    }
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    installed.sort();
    installed.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin): \
         install Debian's postgresql package, or set DCV_BROKER_TEST_DATABASE_URL",
    )
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}
