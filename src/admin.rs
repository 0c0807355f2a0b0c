//! Client administration (`dcv-broker clients register|list|revoke`), for a
//! broker that is running and one that is not.
//!
//! A running broker listens on a local admin socket, a Unix domain socket
//! in its data directory (mode 0600, in a 0700 directory): whoever may open
//! it may administer the broker, as root on DCV's broker host may. Changes
//! made through it take effect at once (a revoked client's tokens stop
//! working on its next call). The protocol is one JSON request line and
//! one JSON reply line per connection, small enough to read in a shell
//! session with `socat`.
//!
//! With no broker running, the subcommands open the store themselves; the
//! store's exclusive lock guarantees no broker is writing meanwhile.
//!
//! The socket also answers `dcv-broker backup` (see [`crate::backup`]).

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    auth::{Auth, AuthConfig, AuthError, ClientInfo, ScopeSet},
    fleet::persist::Store,
    store::SqliteStore,
};

/// The admin socket's file name in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// Largest request line read: a name and a list of scopes.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One administrative operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Register a client.
    Register {
        /// Its name.
        name: String,
        /// Its scopes.
        scopes: ScopeSet,
        /// For an agent, its server.
        server_id: Option<String>,
    },
    /// List every client.
    List,
    /// Revoke a client.
    Revoke {
        /// Its id.
        client_id: String,
    },
}

impl Request {
    fn to_json(&self) -> Value {
        match self {
            Request::Register {
                name,
                scopes,
                server_id,
            } => json!({
                "command": "register",
                "name": name,
                "scopes": scopes.to_string(),
                "server_id": server_id,
            }),
            Request::List => json!({"command": "list"}),
            Request::Revoke { client_id } => json!({"command": "revoke", "client_id": client_id}),
        }
    }

    fn from_json(value: &Value) -> Result<Request, String> {
        let text = |name: &str| value.get(name).and_then(Value::as_str);
        match text("command") {
            Some("register") => Ok(Request::Register {
                name: text("name").ok_or("register needs a name")?.to_owned(),
                scopes: ScopeSet::parse(text("scopes").unwrap_or("")).map_err(|e| e.to_string())?,
                server_id: text("server_id").map(str::to_owned),
            }),
            Some("list") => Ok(Request::List),
            Some("revoke") => Ok(Request::Revoke {
                client_id: text("client_id")
                    .ok_or("revoke needs a client_id")?
                    .to_owned(),
            }),
            _ => Err("command is one of register, list, revoke, backup".into()),
        }
    }
}

/// Runs one operation against a registry; the JSON reply.
pub async fn execute(auth: &Auth, request: &Request) -> Result<Value, AuthError> {
    match request {
        Request::Register {
            name,
            scopes,
            server_id,
        } => {
            let registered = auth.register(name, *scopes, server_id.as_deref()).await?;
            tracing::info!(
                client = %registered.client.id,
                name = %registered.client.name,
                scopes = %registered.client.scopes,
                "client registered"
            );
            let why = format!("{} ({})", registered.client.name, registered.client.scopes);
            audit(auth, "clients register", &registered.client.id, why).await;
            let mut reply = client_json(&registered.client);
            if let Some(map) = reply.as_object_mut() {
                map.insert("client_secret".into(), registered.secret.into());
            }
            Ok(json!({"client": reply}))
        }
        Request::List => Ok(json!({
            "clients": auth.list().iter().map(client_json).collect::<Vec<_>>()
        })),
        Request::Revoke { client_id } => {
            let client = auth.revoke(client_id).await?;
            tracing::info!(client = %client.id, name = %client.name, "client revoked");
            audit(auth, "clients revoke", &client.id, client.name.clone()).await;
            Ok(json!({"client": client_json(&client)}))
        }
    }
}

/// Keeps the audit record of a change made through the admin socket (or
/// on a stopped broker's store): its actor is whoever may open the socket,
/// the broker's own user.
async fn audit(auth: &Auth, method: &str, client_id: &str, reason: String) {
    use crate::fleet::persist::{AuditItem, AuditRecord, wall_clock};
    auth.record_audit(AuditRecord {
        at: wall_clock(),
        actor: ADMIN_ACTOR.to_owned(),
        request_id: String::new(),
        method: method.to_owned(),
        peer: None,
        items: vec![AuditItem {
            id: client_id.to_owned(),
            outcome: AuditItem::OK.to_owned(),
            reason,
        }],
    })
    .await;
}

/// The actor of changes made through the admin socket.
pub const ADMIN_ACTOR: &str = "admin";

fn client_json(client: &ClientInfo) -> Value {
    json!({
        "client_id": client.id,
        "name": client.name,
        "scopes": client.scopes.to_string(),
        "server_id": client.server_id,
        "created_at": rfc3339(client.created_at),
        "revoked_at": client.revoked_at.map(rfc3339),
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The admin socket, listening. Dropping it removes the socket file.
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl AdminSocket {
    /// Listens at `path`, replacing a socket file no broker answers on (a
    /// previous broker that was killed), and refusing one that answers.
    pub async fn bind(path: &Path) -> io::Result<AdminSocket> {
        if UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running broker", path.display()),
            ));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = bind_private(path)?;
        Ok(AdminSocket {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers connections until the future is dropped; `backups` is what
    /// `dcv-broker backup` copies.
    pub async fn serve(self, auth: Auth, backups: crate::backup::Source) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let auth = auth.clone();
            let backups = backups.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &auth, &backups).await {
                    tracing::debug!(error = %e, "admin socket: connection failed");
                }
            });
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(
    stream: UnixStream,
    auth: &Auth,
    backups: &crate::backup::Source,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    let request = serde_json::from_str::<Value>(&line).map_err(|e| format!("not JSON: {e}"));
    // A backup's reply is the copy itself, streamed (see `backup`).
    if let Ok(value) = &request
        && value.get("command").and_then(Value::as_str) == Some(crate::backup::COMMAND)
    {
        crate::backup::answer(&mut write, backups).await?;
        return write.shutdown().await;
    }
    let reply = match request.and_then(|v| Request::from_json(&v)) {
        Ok(request) => match execute(auth, &request).await {
            Ok(reply) => reply,
            Err(e) => json!({"error": e.to_string()}),
        },
        Err(e) => json!({"error": e}),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    write.shutdown().await
}

/// Why an administrative command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The broker or the store refused the operation.
    #[error("{0}")]
    Refused(String),
    /// Neither a running broker nor the store could be reached.
    #[error("{0}")]
    Unreachable(String),
}

/// Binds a Unix socket at `path` that only its owner may connect to from
/// the first moment: `bind` creates the file with the umask's mode (0775
/// under umask 002, so a group member could connect before a `chmod`), so
/// it is bound in a directory of its own (0700), made 0600 there, and only
/// then renamed into place. A listener keeps working under its new name.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Short names: a socket's path is limited to about 100 bytes, and the
    // staged path must fit wherever the final one does.
    let staging = parent.join(format!(".a{}", std::process::id()));
    // Left by an earlier process with this pid that was killed here.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let bound = (|| {
        let inside = staging.join("s");
        let listener = UnixListener::bind(&inside)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Runs `request` on the broker that owns `data_dir`: through its admin
/// socket (`socket`, default `DIR/admin.sock`) when it runs, else on the
/// store directly.
pub async fn run(
    data_dir: &Path,
    socket: Option<&Path>,
    request: &Request,
) -> Result<Value, AdminError> {
    let socket = socket.map_or_else(|| data_dir.join(SOCKET_NAME), Path::to_path_buf);
    match UnixStream::connect(&socket).await {
        Ok(stream) => through_socket(stream, request).await,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            offline(data_dir, request).await
        }
        Err(e) => Err(AdminError::Unreachable(format!(
            "cannot reach the broker's admin socket {}: {e}",
            socket.display()
        ))),
    }
}

async fn through_socket(stream: UnixStream, request: &Request) -> Result<Value, AdminError> {
    let unreachable = |e: io::Error| AdminError::Unreachable(format!("admin socket: {e}"));
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{}\n", request.to_json()).as_bytes())
        .await
        .map_err(unreachable)?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(unreachable)?;
    let reply: Value = serde_json::from_str(&line)
        .map_err(|e| AdminError::Unreachable(format!("admin socket: bad reply: {e}")))?;
    match reply.get("error").and_then(Value::as_str) {
        Some(error) => Err(AdminError::Refused(error.to_owned())),
        None => Ok(reply),
    }
}

async fn offline(data_dir: &Path, request: &Request) -> Result<Value, AdminError> {
    let dir = data_dir.to_path_buf();
    let (store, snapshot) = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
        .await
        .map_err(|e| AdminError::Unreachable(e.to_string()))?
        .map_err(|e| AdminError::Unreachable(e.to_string()))?;
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let result = match Auth::restore(AuthConfig::default(), shared, &snapshot).await {
        Ok(auth) => execute(&auth, request).await,
        Err(e) => Err(e),
    };
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| AdminError::Unreachable(e.to_string()))?
        .map_err(|e| AdminError::Refused(e.to_string()))?;
    result.map_err(|e| AdminError::Refused(e.to_string()))
}

/// The reply as people read it (`json`: as the socket sent it).
pub fn render(request: &Request, reply: &Value, json: bool) -> String {
    if json {
        return format!("{reply:#}\n");
    }
    let field = |client: &Value, name: &str| {
        client
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned()
    };
    match request {
        Request::Register { .. } => {
            let client = &reply["client"];
            format!(
                "client-id: {}\nclient-secret: {}\nname: {}\nscopes: {}\n{}\
                 The secret is shown only now and cannot be recovered: store it safely.\n",
                field(client, "client_id"),
                field(client, "client_secret"),
                field(client, "name"),
                field(client, "scopes"),
                match client.get("server_id").and_then(Value::as_str) {
                    Some(server) => format!("server-id: {server}\n"),
                    None => String::new(),
                },
            )
        }
        Request::List => {
            let clients = reply["clients"].as_array().cloned().unwrap_or_default();
            if clients.is_empty() {
                return "(no clients)\n".into();
            }
            let rows: Vec<[String; 6]> = clients
                .iter()
                .map(|c| {
                    [
                        field(c, "client_id"),
                        field(c, "name"),
                        field(c, "scopes"),
                        field(c, "server_id"),
                        field(c, "created_at"),
                        field(c, "revoked_at"),
                    ]
                })
                .collect();
            let header = [
                "CLIENT ID",
                "NAME",
                "SCOPES",
                "SERVER",
                "CREATED",
                "REVOKED",
            ];
            crate::table::aligned(header, rows)
        }
        Request::Revoke { .. } => {
            let client = &reply["client"];
            format!(
                "revoked client {} ({}) at {}: it gets no new tokens and its tokens stop working now\n",
                field(client, "client_id"),
                field(client, "name"),
                field(client, "revoked_at"),
            )
        }
    }
}

/// A registration's reply as DCV Session Manager's `register-api-client`
/// prints it: exactly `client-id: ID` and `client-password: SECRET`, the
/// two lines set-up tools written for DCV parse (the Access Console's
/// wizard: `client-id: (.*?)\n.*?client-password: (.*?)\n`). Nothing else
/// is printed: an extra line could land between the two.
pub fn render_dcv_registration(reply: &Value) -> Result<String, String> {
    let client = &reply["client"];
    let field = |name: &str| {
        client
            .get(name)
            .and_then(Value::as_str)
            // A line break inside a value would end the line early.
            .filter(|v| !v.is_empty() && !v.contains(['\n', '\r']))
            .ok_or_else(|| format!("the broker's reply has no usable {name}"))
    };
    Ok(format!(
        "client-id: {}\nclient-password: {}\n",
        field("client_id")?,
        field("client_secret")?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dcv_registration_is_two_lines() {
        let reply = json!({"client": {"client_id": "c1", "client_secret": "s-_1",
                                      "name": "ac", "scopes": "read"}});
        assert_eq!(
            render_dcv_registration(&reply).unwrap(),
            "client-id: c1\nclient-password: s-_1\n"
        );
        assert!(render_dcv_registration(&json!({"client": {"client_id": "c1"}})).is_err());
    }

    #[test]
    fn the_client_list_is_an_aligned_table() {
        let reply = json!({"clients": [
            {"client_id": "c1", "name": "portal", "scopes": "servers:read",
             "created_at": "2026-01-01T00:00:00Z"},
            {"client_id": "agent-0001", "name": "東京", "scopes": "agent",
             "server_id": "s1", "created_at": "2026-01-02T00:00:00Z",
             "revoked_at": "2026-01-03T00:00:00Z"},
        ]});
        assert_eq!(
            render(&Request::List, &reply, false),
            "CLIENT ID   NAME    SCOPES        SERVER  CREATED               REVOKED\n\
             c1          portal  servers:read  -       2026-01-01T00:00:00Z  -\n\
             agent-0001  東京    agent         s1      2026-01-02T00:00:00Z  2026-01-03T00:00:00Z\n"
        );
        assert_eq!(
            render(&Request::List, &json!({"clients": []}), false),
            "(no clients)\n"
        );
    }
}
