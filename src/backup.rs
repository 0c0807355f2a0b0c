//! `dcv-broker backup --out FILE`: a copy of a running broker's store,
//! taken through its admin socket while it keeps serving.
//!
//! The broker makes the copy (it owns the store, and holds its lock: see
//! `store::backup`) and streams it back over the socket; this command
//! writes it. So `--out` is read where the command runs (a relative path
//! is fine) and the file belongs to whoever runs the command, in a
//! directory the broker need not be able to write. The price is a second,
//! short-lived copy beside the store while the stream runs.
//!
//! The file holds client secrets' hashes and the token-signing key: it is
//! created its owner's alone (0600) from the first moment, as a hidden
//! temporary file in the target directory, fsynced, then moved into place
//! (refusing to replace a file unless `--force`), and the directory
//! fsynced, so that after a crash there is either the whole backup or
//! none. It is a complete store: `dcv-broker --data-dir DIR` starts from
//! it once it is `DIR/broker.sqlite3`.
//!
//! The protocol: the request line `{"command": "backup"}`; the reply line
//! `{"backup": {"bytes": N}}` followed by exactly N bytes of the copy, or
//! `{"error": "..."}`.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};
use tokio::{
    io::{
        AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt as _, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
    net::UnixStream,
};

use crate::store::SqliteStore;

/// The admin socket's command.
pub const COMMAND: &str = "backup";

/// Longest reply line read before the copy: one small JSON object.
const MAX_HEADER_BYTES: u64 = 4096;

/// How long the broker waits for a command that stopped reading the copy.
const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// What a running broker can back up.
#[derive(Debug, Clone)]
pub enum Source {
    /// Its SQLite store.
    Sqlite(SqliteStore),
    /// Nothing: it keeps its state in PostgreSQL.
    Postgres,
    /// Nothing: it keeps nothing (`--in-memory`).
    InMemory,
}

/// Answers a backup request on the admin socket: the copy, or why not.
pub async fn answer<W: AsyncWrite + Unpin>(write: &mut W, source: &Source) -> io::Result<()> {
    let store = match source {
        Source::Sqlite(store) => store,
        Source::Postgres => {
            return refuse(
                write,
                "this broker keeps its state in PostgreSQL (--database-url), not in a \
                 SQLite store: back the database up with PostgreSQL's own tools, for \
                 example `pg_dump --format=custom --file=FILE DBNAME`",
            )
            .await;
        }
        Source::InMemory => {
            return refuse(
                write,
                "this broker keeps nothing (--in-memory): there is nothing to back up",
            )
            .await;
        }
    };
    match store.back_up().await {
        Ok(copy) => {
            let header = json!({"backup": {"bytes": copy.bytes}});
            write.write_all(format!("{header}\n").as_bytes()).await?;
            let mut file = tokio::fs::File::from_std(copy.file).take(copy.bytes);
            stream(&mut file, write).await
        }
        Err(e) => refuse(write, &e.to_string()).await,
    }
}

/// Copies `file` to `write`, giving up on a reader that takes nothing for
/// [`STALL_TIMEOUT`]: the copy takes disk space while it is held open.
async fn stream<R, W>(file: &mut R, write: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = file.read(&mut chunk).await?;
        if n == 0 {
            return write.flush().await;
        }
        tokio::time::timeout(STALL_TIMEOUT, write.write_all(&chunk[..n]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the reader stalled"))??;
    }
}

async fn refuse<W: AsyncWrite + Unpin>(write: &mut W, why: &str) -> io::Result<()> {
    let reply = json!({ "error": why });
    write.write_all(format!("{reply}\n").as_bytes()).await
}

/// What `dcv-broker backup` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The file.
    pub out: PathBuf,
    /// Its length.
    pub bytes: u64,
}

/// Backs up the broker listening on `socket`, whose store is in
/// `data_dir`, into `out` (replacing a file there only if `force`).
pub async fn run(
    socket: &Path,
    data_dir: &Path,
    out: &Path,
    force: bool,
) -> Result<Written, String> {
    let target = Target::check(out, force)?;
    refuse_the_store_itself(&target.dir, out, data_dir)?;
    let mut partial = Partial::create(&target.partial).await?;
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
                "no broker answers on {} ({e}): a backup is taken from a running broker \
                 through its admin socket (give --data-dir or --admin-socket as the broker \
                 has them); a stopped broker's store is DIR/broker.sqlite3, which can be \
                 copied as it is while the broker stays stopped",
                socket.display()
            ),
            _ => format!(
                "cannot reach the broker's admin socket {}: {e}",
                socket.display()
            ),
        })?;
    let bytes = receive(stream, partial.file()?).await?;
    partial.place(out, force).await?;
    Ok(Written {
        out: out.to_path_buf(),
        bytes,
    })
}

/// Where the backup goes, checked before the broker does any work.
struct Target {
    dir: PathBuf,
    partial: PathBuf,
}

impl Target {
    fn check(out: &Path, force: bool) -> Result<Target, String> {
        let name = out
            .file_name()
            .ok_or_else(|| format!("--out {} does not name a file", out.display()))?;
        let dir = match out.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", dir.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "the directory {} does not exist; create it first",
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        match std::fs::symlink_metadata(out) {
            Ok(meta) if meta.is_dir() => {
                return Err(format!(
                    "{} is a directory; --out names a file",
                    out.display()
                ));
            }
            Ok(_) if !force => {
                return Err(format!(
                    "{} exists; give --force to replace it",
                    out.display()
                ));
            }
            _ => {}
        }
        let mut partial = std::ffi::OsString::from(".");
        partial.push(name);
        partial.push(format!(".partial-{}", std::process::id()));
        Ok(Target {
            dir: dir.to_path_buf(),
            partial: dir.join(partial),
        })
    }
}

/// Refuses to write over the store (or its write-ahead log) in `data_dir`:
/// the broker keeps its own file open, and at its next start would pair
/// the backup with the old log.
fn refuse_the_store_itself(dir: &Path, out: &Path, data_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let same_dir = match (std::fs::metadata(dir), std::fs::metadata(data_dir)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    let store_file = out
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(crate::store::FILE_NAME));
    match same_dir && store_file {
        true => Err(format!(
            "{} is the running broker's own store; write the backup elsewhere",
            out.display()
        )),
        false => Ok(()),
    }
}

/// The backup being written: a hidden file beside its final name, removed
/// unless it is moved into place.
struct Partial {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    placed: bool,
}

impl Partial {
    async fn create(path: &Path) -> Result<Partial, String> {
        let mut options = tokio::fs::OpenOptions::new();
        // Its owner's alone from the first moment: no chmod afterwards.
        options.read(true).write(true).create_new(true).mode(0o600);
        let file = options
            .open(path)
            .await
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Partial {
            path: path.to_path_buf(),
            file: Some(file),
            placed: false,
        })
    }

    fn file(&mut self) -> Result<&mut tokio::fs::File, String> {
        self.file
            .as_mut()
            .ok_or_else(|| format!("{} is closed", self.path.display()))
    }

    /// Checks the file is a SQLite database, makes it durable, and moves
    /// it to `out`, then makes the move durable.
    async fn place(mut self, out: &Path, force: bool) -> Result<(), String> {
        let at = |e: io::Error| format!("{}: {e}", self.path.display());
        let mut file = self
            .file
            .take()
            .ok_or_else(|| format!("{} is closed", self.path.display()))?;
        file.flush().await.map_err(at)?;
        file.sync_all().await.map_err(at)?;
        file.seek(io::SeekFrom::Start(0)).await.map_err(at)?;
        let mut magic = [0; 16];
        file.read_exact(&mut magic).await.map_err(at)?;
        if &magic != SQLITE_MAGIC {
            return Err("the broker sent something that is not a SQLite database".into());
        }
        drop(file);
        let (partial, out_owned) = (self.path.clone(), out.to_path_buf());
        tokio::task::spawn_blocking(move || move_into_place(&partial, &out_owned, force))
            .await
            .map_err(|e| e.to_string())??;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Moves `partial` to `out`: without `force` through a hard link, which
/// fails if `out` exists, so a file that appeared meanwhile is never
/// replaced; with it, by rename. Then fsyncs the directory.
fn move_into_place(partial: &Path, out: &Path, force: bool) -> Result<(), String> {
    if force {
        std::fs::rename(partial, out)
            .map_err(|e| format!("cannot move the backup to {}: {e}", out.display()))?;
    } else {
        std::fs::hard_link(partial, out).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                format!("{} exists; give --force to replace it", out.display())
            }
            _ => format!("cannot move the backup to {}: {e}", out.display()),
        })?;
        std::fs::remove_file(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    }
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// Sends the request and copies the reply's bytes into `file`; how many.
async fn receive(stream: UnixStream, file: &mut tokio::fs::File) -> Result<u64, String> {
    let failed = |e: io::Error| format!("admin socket: {e}");
    let (read, mut write) = stream.into_split();
    let request = json!({ "command": COMMAND });
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(failed)?;
    let mut reader = BufReader::new(read);
    let bytes = header(&mut reader).await?;
    let copied = tokio::io::copy(&mut (&mut reader).take(bytes), file)
        .await
        .map_err(|e| format!("receiving the backup: {e}"))?;
    if copied != bytes {
        return Err(format!(
            "the broker's reply ended after {copied} of {bytes} bytes; nothing was written"
        ));
    }
    Ok(bytes)
}

/// Reads the reply line: the copy's length, or the broker's refusal.
async fn header<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Result<u64, String> {
    let mut line = String::new();
    (&mut *reader)
        .take(MAX_HEADER_BYTES)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("admin socket: {e}"))?;
    if line.is_empty() {
        return Err("the broker closed the admin socket without a reply".into());
    }
    let reply: Value =
        serde_json::from_str(&line).map_err(|e| format!("admin socket: bad reply: {e}"))?;
    if let Some(error) = reply.get("error").and_then(Value::as_str) {
        return Err(error.to_owned());
    }
    reply["backup"]["bytes"]
        .as_u64()
        .ok_or_else(|| format!("admin socket: unexpected reply {line:?}"))
}

/// What the command prints.
pub fn render(written: &Written, json: bool) -> String {
    if json {
        return format!(
            "{:#}\n",
            json!({"out": written.out.display().to_string(), "bytes": written.bytes})
        );
    }
    format!(
        "backed up the broker's store to {} ({} bytes); a broker starts from it as DIR/{} with --data-dir DIR\n",
        written.out.display(),
        written.bytes,
        crate::store::FILE_NAME,
    )
}
