//! The store's files on disk, through the real binary: every file in the
//! data directory is its owner's alone from the moment it exists (the
//! store holds the token-signing key), a data directory or store others
//! may write is refused and one they may read is warned about, an empty
//! store that was already there is refused rather than silently replaced,
//! and a damaged store is reported in one line.
#![cfg(unix)]

mod common;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::{fs::PermissionsExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::SystemTime,
};

use common::process::{BROKER_BIN, BrokerProcess, PATIENCE};
use dcv_broker::{
    demo,
    fleet::persist::{Change, Store as _, StoredServer},
    store::{FILE_NAME, SqliteStore},
};

/// SIGXFSZ: what the kernel sends a process that writes past its
/// file-size limit (`ulimit -f`). Its default action ends the process on
/// the spot, with no chance to tidy up.
const SIGXFSZ: i32 = 25;

/// A directory under the system temp dir with exactly `mode`, removed on
/// drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(mode: u32) -> TempDir {
        let path = std::env::temp_dir().join(format!("dcv-broker-files-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// A directory `name` inside, with exactly `mode`.
    fn subdir(&self, name: &str, mode: u32) -> PathBuf {
        let dir = self.0.join(name);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs the binary with `args` under a file-size limit of `kib` KiB and
/// umask 022 (what a service gets by default), and returns how it ended.
/// The limit ends the process at the first write past it: at that moment,
/// and so on disk afterwards, every file it created has the mode it had
/// while the store was being created.
async fn killed_past(kib: u32, args: &[&std::ffi::OsStr]) -> ExitStatus {
    let mut command = tokio::process::Command::new("bash");
    command
        .args([
            "-c",
            r#"ulimit -c 0 && ulimit -f "$1" && umask 022 && shift && exec "$@""#,
            "bash",
        ])
        .arg(kib.to_string())
        .arg(BROKER_BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("bash runs");
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the binary outlived a {kib} KiB file-size limit: {args:?}"))
        .expect("wait works")
}

/// The race of the report: a local user who opens a store file while the
/// broker creates it keeps a descriptor that can read the signing key if
/// the file was readable by others at that moment, even if the broker
/// narrows it a moment later. Here the process is stopped dead at each
/// step of creating a store (the serving broker's, and the one `clients
/// register` creates for a stopped broker), in a data directory that
/// already exists with mode 0755, as a package makes it: whatever exists at
/// that moment must already be 0600.
#[tokio::test]
async fn every_store_file_is_private_from_its_first_moment() {
    let commands: [(&str, &[&str]); 2] = [
        ("the broker", &["--listen", "127.0.0.1:0", "--data-dir"]),
        (
            "dcv-broker clients register",
            &[
                "clients",
                "register",
                "--name",
                "ops",
                "--scopes",
                "read",
                "--data-dir",
            ],
        ),
    ];
    for (what, command) in commands {
        let mut seen = BTreeSet::new();
        // KiB written before the kill: 0 stops it at the first byte, the
        // larger limits in the journal, the write-ahead log and the
        // migrations.
        for kib in [0, 1, 2, 4, 8, 12, 16, 24, 32] {
            let parent = TempDir::new(0o755);
            let data = parent.subdir("data", 0o755);
            let mut args: Vec<&std::ffi::OsStr> = command.iter().map(|a| a.as_ref()).collect();
            args.push(data.as_os_str());
            let status = killed_past(kib, &args).await;
            if what == "the broker" {
                assert_eq!(
                    status.signal(),
                    Some(SIGXFSZ),
                    "the broker was stopped while creating its store ({kib} KiB): {status:?}"
                );
            }
            for name in listing(&data) {
                let file_mode = mode(&data.join(&name));
                assert_eq!(
                    file_mode & 0o077,
                    0,
                    "{name} was {file_mode:04o} while {what} created the store, stopped past \
                     {kib} KiB: others could open it"
                );
                seen.insert(name);
            }
        }
        // The kills hit the creation of each of SQLite's files.
        for name in [
            FILE_NAME,
            &format!("{FILE_NAME}-journal"),
            &format!("{FILE_NAME}-wal"),
        ] {
            assert!(
                seen.contains(name),
                "no kill of {what} caught {name}: {seen:?}"
            );
        }
    }
}

/// Runs the broker on `dir`, expecting it to refuse to start; returns its
/// stderr.
async fn refused(dir: &Path) -> String {
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("a refused store stops the broker at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened: {stderr}");
    stderr
}

/// Starts the broker on `dir`, with no demo fleet.
async fn serve(dir: &Path) -> BrokerProcess {
    BrokerProcess::start_exactly(&["--data-dir".as_ref(), dir.as_os_str()]).await
}

#[tokio::test]
async fn a_data_dir_or_store_others_may_use_is_refused_or_warned_about() {
    // Others may write the data directory: they could put their own file
    // where SQLite creates its log. Refused; nothing is created.
    for dir_mode in [0o777, 0o770, 0o1777] {
        let parent = TempDir::new(0o755);
        let data = parent.subdir("data", dir_mode);
        let message = refused(&data).await;
        assert!(
            message.contains("can be written by other users") && message.contains("chmod 700"),
            "{dir_mode:o}: {message}"
        );
        assert!(message.contains(&*data.to_string_lossy()), "{message}");
        assert_eq!(listing(&data), Vec::<String>::new(), "{dir_mode:o}");
    }

    // Others may read it (a package's 0755): a loud warning, and the files
    // are private anyway.
    let parent = TempDir::new(0o755);
    let data = parent.subdir("data", 0o755);
    let mut broker = serve(&data).await;
    let _ = broker
        .logged("the data directory can be read by other users")
        .await;
    let names = listing(&data);
    assert!(
        names.contains(&"admin.sock".to_owned()),
        "the admin socket is there, and its staging directory is gone: {names:?}"
    );
    assert!(names.iter().all(|n| !n.starts_with(".a")), "{names:?}");
    for name in names {
        let file_mode = mode(&data.join(&name));
        assert_eq!(file_mode & 0o077, 0, "{name}: {file_mode:04o}");
    }
    broker.terminate().await;

    // A store others may read (an older build's 0644): private before it is
    // opened, and a warning that its keys may be known.
    let file = data.join(FILE_NAME);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let mut broker = serve(&data).await;
    let line = broker
        .logged("could be read by other users and is private now")
        .await;
    assert!(line.contains("DELETE FROM secrets"), "{line}");
    assert_eq!(mode(&file), 0o600);
    broker.terminate().await;
    // The advice works: with the keys deleted, the next start draws new
    // ones.
    let count = |file: &Path| -> i64 {
        let db = rusqlite::Connection::open(file).unwrap();
        db.query_row("SELECT count(*) FROM secrets", [], |r| r.get(0))
            .unwrap()
    };
    assert!(count(&file) > 0);
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute("DELETE FROM secrets", [])
        .unwrap();
    assert_eq!(count(&file), 0);
    let mut broker = serve(&data).await;
    let _ = broker.logged("store loaded").await;
    broker.terminate().await;
    assert!(count(&file) > 0, "new keys were drawn");
    assert_eq!(mode(&file), 0o600);

    // A store others may write: refused, left as it was.
    for file_mode in [0o666, 0o620] {
        fs::set_permissions(&file, fs::Permissions::from_mode(file_mode)).unwrap();
        let before = fs::read(&file).unwrap();
        let message = refused(&data).await;
        assert!(
            message.contains("can be written by other users") && message.contains("chmod 600"),
            "{file_mode:o}: {message}"
        );
        assert!(message.contains(&*file.to_string_lossy()), "{message}");
        assert_eq!(mode(&file), file_mode);
        assert_eq!(fs::read(&file).unwrap(), before);
    }
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();

    // A parent others may write, without the sticky bit: they could swap
    // the data directory. A warning.
    let parent = TempDir::new(0o777);
    let data = parent.subdir("data", 0o700);
    let mut broker = serve(&data).await;
    let line = broker
        .logged("the data directory's parent can be written by other users")
        .await;
    assert!(line.contains(&*parent.path().to_string_lossy()), "{line}");
    broker.terminate().await;
    // With the sticky bit (as /tmp), it cannot.
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let mut broker = serve(&data).await;
    let _ = broker.logged("store loaded").await;
    let log = broker.drain_log().join("\n");
    assert!(!log.contains("parent can be written"), "{log}");
    broker.terminate().await;
}

/// An empty `broker.sqlite3` is not a new store: SQLite would take it for
/// one, and the broker would start with new signing keys and no clients or
/// holds. The empty file the broker itself creates a moment before SQLite
/// opens it is, and a start that fails after creating it leaves nothing
/// behind that the next start would refuse.
#[tokio::test]
async fn an_empty_store_that_was_there_is_refused() {
    let parent = TempDir::new(0o755);
    let data = parent.subdir("data", 0o700);
    let file = data.join(FILE_NAME);
    fs::write(&file, b"").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let message = refused(&data).await;
    assert!(
        message.contains("is not a dcv-broker store") && message.contains("it is empty"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    assert_eq!(fs::read(&file).unwrap(), b"", "left as it was");
    assert_eq!(listing(&data), [FILE_NAME]);

    // A first start that fails once the broker has created the file (here
    // SQLite cannot create its write-ahead log) removes it again.
    fs::remove_file(&file).unwrap();
    let wal = data.join(format!("{FILE_NAME}-wal"));
    fs::create_dir(&wal).unwrap();
    let message = refused(&data).await;
    assert!(message.contains(FILE_NAME), "{message}");
    assert_eq!(listing(&data), [format!("{FILE_NAME}-wal")], "{message}");
    fs::remove_dir(&wal).unwrap();
    // And the next start creates the store.
    let mut broker = serve(&data).await;
    let _ = broker.logged("store loaded").await;
    broker.terminate().await;
    assert!(fs::metadata(&file).unwrap().len() > 0);
}

/// A store whose pages SQLite's quick_check finds damaged is refused in one
/// line (SQLite reports a header line and one line per problem).
#[tokio::test]
async fn a_damaged_store_is_reported_in_one_line() {
    let parent = TempDir::new(0o755);
    let data = parent.subdir("data", 0o700);
    {
        let (store, _) = SqliteStore::open(&data).unwrap();
        let changes = (0..300)
            .map(|i| {
                Change::PutServer(StoredServer {
                    id: demo::server_id(i),
                    description: demo::description(i),
                    holds: Vec::new(),
                    state_version: 0,
                    registered_at: SystemTime::now(),
                    last_seen: SystemTime::now(),
                    agent_departed: false,
                })
            })
            .collect();
        store.submit(changes).wait().await.unwrap();
        store.close().unwrap();
    }
    // Point the first cells of three table leaf pages (type 0x0D) past the
    // end of their page: the last three, which hold servers' rows (the
    // schema's own pages come first, and damaging them fails the open
    // before quick_check runs).
    let file = data.join(FILE_NAME);
    let mut bytes = fs::read(&file).unwrap();
    let page = 4096;
    let leaves: Vec<usize> = (2..bytes.len() / page)
        .rev()
        .map(|p| p * page)
        .filter(|&at| bytes[at] == 0x0D && u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) >= 2)
        .take(3)
        .collect();
    assert_eq!(leaves.len(), 3, "the store has table leaf pages to damage");
    for at in leaves {
        bytes[at + 8..at + 12].copy_from_slice(&[0xFF, 0x00, 0xFF, 0x10]);
    }
    fs::write(&file, &bytes).unwrap();
    let message = refused(&data).await;
    assert!(
        message.contains("is damaged") && message.contains("quick_check"),
        "{message}"
    );
    assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    assert!(message.contains("out of range"), "{message}");
}
