//! The local DCV server, driven through its `dcv` command-line tool with
//! the commands and flags of DCV's Administrator Guide ("Managing
//! sessions", "Managing session authorization", "Taking a screenshot").
//!
//! Every call runs the tool directly (argv, never a shell), with a timeout
//! after which the child is killed, and reads its output up to a bound; a
//! failing call's stderr, trimmed and bounded, becomes the reason the
//! broker is told. Nothing here waits on anything but the child.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime},
};

use base64::Engine;
use serde_json::Value;
use tokio::{io::AsyncReadExt, process::Command};

use dcv_broker::pb;

/// `get-screenshot --json` carries a base64 image; the broker takes at most
/// 8 MiB of image data, so 16 MiB of output is more than any answer we use.
const MAX_STDOUT_BYTES: u64 = 16 * 1024 * 1024;
/// Stderr is only read for the failure reason.
const MAX_STDERR_BYTES: u64 = 64 * 1024;
/// The failure reason sent to the broker (it bounds reasons too).
pub const MAX_REASON_CHARS: usize = 512;
/// Images one screenshot answer may carry (the broker's bound).
pub const MAX_SCREENSHOT_IMAGES: usize = 16;
/// Image bytes one screenshot answer may carry (the broker's bound).
pub const MAX_SCREENSHOT_BYTES: usize = 8 * 1024 * 1024;

/// Why a `dcv` call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum DcvError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("dcv {verb} timed out after {}s", .timeout.as_secs())]
    Timeout { verb: String, timeout: Duration },
    /// It ran and failed; the reason is its stderr.
    #[error("dcv {verb}: {reason}")]
    Failed { verb: String, reason: String },
    #[error("dcv {verb}: {reason}")]
    BadOutput { verb: String, reason: String },
    /// Refused before running anything: the input is not fit for `dcv`.
    #[error("{0}")]
    Refused(String),
}

/// The `dcv` tool.
#[derive(Clone, Debug)]
pub struct Dcv {
    command: PathBuf,
    timeout: Duration,
}

/// A session as `dcv list-sessions --json` / `describe-session --json` show it.
#[derive(Clone, Debug, PartialEq)]
pub struct DcvSession {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub kind: pb::SessionType,
    pub num_of_connections: Option<i32>,
    pub creation_time: Option<SystemTime>,
    pub last_disconnection_time: Option<SystemTime>,
}

/// Files an instruction may name, each confined to its folder.
#[derive(Clone, Debug)]
pub struct Folders {
    pub init: PathBuf,
    pub autorun: PathBuf,
}

impl Dcv {
    pub fn new(command: PathBuf, timeout: Duration) -> Dcv {
        Dcv { command, timeout }
    }

    /// Runs `dcv ARGS`; its stdout, or why not.
    pub async fn run(&self, args: &[OsString]) -> Result<Vec<u8>, DcvError> {
        let verb = args
            .first()
            .map_or_else(String::new, |a| a.to_string_lossy().into_owned());
        tracing::debug!(command = %self.command.display(), ?args, "running dcv");
        let mut child = Command::new(&self.command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DcvError::Spawn {
                command: self.command.display().to_string(),
                source,
            })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(DcvError::Failed {
                verb,
                reason: "no output pipes".into(),
            });
        };
        let work = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (o, e) = tokio::join!(
                read_bounded(stdout, MAX_STDOUT_BYTES + 1, &mut out),
                read_bounded(stderr, MAX_STDERR_BYTES, &mut err),
            );
            o.and(e)?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(DcvError::Failed {
                    verb,
                    reason: e.to_string(),
                });
            }
            // Dropping `work` drops the child, which kill_on_drop kills.
            Err(_) => {
                return Err(DcvError::Timeout {
                    verb,
                    timeout: self.timeout,
                });
            }
        };
        if out.len() as u64 > MAX_STDOUT_BYTES {
            return Err(DcvError::BadOutput {
                verb,
                reason: format!("more than {MAX_STDOUT_BYTES} bytes of output"),
            });
        }
        if !status.success() {
            let mut reason = reason_from(&err);
            if reason.is_empty() {
                reason = format!("exited with {status}");
            }
            return Err(DcvError::Failed { verb, reason });
        }
        Ok(out)
    }

    /// `dcv list-sessions --json`.
    pub async fn list_sessions(&self) -> Result<Vec<DcvSession>, DcvError> {
        let out = self.run(&argv(&["list-sessions", "--json"])).await?;
        parse_session_list(&out).map_err(|reason| DcvError::BadOutput {
            verb: "list-sessions".into(),
            reason,
        })
    }

    /// `dcv describe-session ID --json`: `Ok(None)` when dcv says it fails
    /// (no such session); a timeout or a spawn error stays an error, so that
    /// a hung tool is never read as "the session is not there".
    pub async fn describe_session(&self, id: &str) -> Result<Option<DcvSession>, DcvError> {
        check_session_id(id)?;
        let args = vec!["describe-session".into(), id.into(), "--json".into()];
        match self.run(&args).await {
            Ok(out) => {
                let v: Value = serde_json::from_slice(&out).map_err(|e| DcvError::BadOutput {
                    verb: "describe-session".into(),
                    reason: format!("not JSON: {e}"),
                })?;
                Ok(parse_session(&v).filter(|s| s.id == id))
            }
            Err(DcvError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `dcv close-session ID`.
    pub async fn close_session(&self, id: &str) -> Result<(), DcvError> {
        check_session_id(id)?;
        self.run(&["close-session".into(), id.into()])
            .await
            .map(drop)
    }

    /// `dcv set-permissions --session ID --file PATH`.
    pub async fn set_permissions(&self, id: &str, file: &Path) -> Result<(), DcvError> {
        check_session_id(id)?;
        let args: Vec<OsString> = vec![
            "set-permissions".into(),
            "--session".into(),
            id.into(),
            "--file".into(),
            file.into(),
        ];
        self.run(&args).await.map(drop)
    }

    /// `dcv get-screenshot --max-width W --max-height H --format PNG|JPEG --json ID`.
    pub async fn get_screenshot(
        &self,
        id: &str,
        max_width: i32,
        max_height: i32,
        format: &str,
    ) -> Result<Vec<pb::SessionScreenshotImage>, DcvError> {
        check_session_id(id)?;
        let args = screenshot_argv(id, max_width, max_height, format)?;
        let out = self.run(&args).await?;
        parse_screenshot(&out, format).map_err(|reason| DcvError::BadOutput {
            verb: "get-screenshot".into(),
            reason,
        })
    }
}

/// Longest session id passed to `dcv` (the broker's own bound is lower).
const MAX_SESSION_ID_BYTES: usize = 256;

/// A session id from an instruction, checked before it becomes an argv
/// item: a leading `-` would read as an option, and control characters have
/// no business in an id.
pub fn check_session_id(id: &str) -> Result<(), DcvError> {
    if id.is_empty()
        || id.len() > MAX_SESSION_ID_BYTES
        || id.starts_with('-')
        || id.chars().any(char::is_control)
    {
        return Err(DcvError::Refused(format!("invalid session id {id:?}")));
    }
    Ok(())
}

/// A value given after an option: refused when it could read as an option.
fn check_value(what: &str, value: &str) -> Result<(), String> {
    if value.starts_with('-') || value.chars().any(char::is_control) {
        return Err(format!(
            "invalid {what} {value:?}: it may not start with - or hold control characters"
        ));
    }
    Ok(())
}

/// Reads up to `limit` bytes of `pipe` into `buf`; past its bound output is
/// read and thrown away, so that a chatty child finishes instead of
/// blocking on a full pipe (the timeout bounds how long that can take).
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(
    pipe: R,
    limit: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut bounded = pipe.take(limit);
    bounded.read_to_end(buf).await?;
    tokio::io::copy(&mut bounded.into_inner(), &mut tokio::io::sink()).await?;
    Ok(())
}

fn argv(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// The failure reason from a child's stderr: its text, on one line,
/// bounded, without control characters.
pub fn reason_from(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let clean: String = joined.chars().filter(|c| !c.is_control()).collect();
    clean.trim().chars().take(MAX_REASON_CHARS).collect()
}

/// The argv of `dcv create-session` for an instruction; files it names are
/// resolved inside their folders (an instruction is input: `..` and
/// absolute paths are refused).
pub fn create_session_argv(
    c: &pb::CreateSessionInstruction,
    folders: &Folders,
    permissions_file: Option<&Path>,
) -> Result<Vec<OsString>, String> {
    let kind = match pb::SessionType::try_from(c.r#type) {
        Ok(pb::SessionType::Virtual) => "virtual",
        Ok(pb::SessionType::Console) => "console",
        _ => return Err(format!("unknown session type {}", c.r#type)),
    };
    check_session_id(&c.session_id).map_err(|e| e.to_string())?;
    if c.owner.is_empty() {
        return Err("invalid owner \"\"".into());
    }
    check_value("owner", &c.owner)?;
    check_value("name", &c.name)?;
    check_value("storage root", &c.storage_root)?;
    let mut args: Vec<OsString> = argv(&["create-session", "--type", kind]);
    args.extend(["--owner".into(), OsString::from(&c.owner)]);
    args.extend(["--name".into(), OsString::from(&c.name)]);
    // A virtual session runs as its owner (`--user`); a console session
    // runs as whoever is logged in at the console.
    if kind == "virtual" {
        args.extend(["--user".into(), OsString::from(&c.owner)]);
    }
    if !c.init_file.is_empty() {
        let path = confine(&folders.init, &c.init_file).map_err(|e| format!("InitFile {e}"))?;
        args.extend(["--init".into(), path.into_os_string()]);
    }
    if !c.autorun_file.is_empty() {
        confine(&folders.autorun, &c.autorun_file).map_err(|e| format!("AutorunFile {e}"))?;
        // The dcv tool has no flag for it; DCV's agent runs it from its own
        // init wrapper, which this agent does not have yet.
        return Err("AutorunFile is not supported by this agent yet".into());
    }
    if c.max_concurrent_clients > 0 {
        args.extend([
            "--max-concurrent-clients".into(),
            c.max_concurrent_clients.to_string().into(),
        ]);
    }
    if kind == "virtual" {
        let gl = if c.dcv_gl_enabled { "on" } else { "off" };
        args.extend(["--gl".into(), gl.into()]);
    }
    if !c.storage_root.is_empty() {
        args.extend(["--storage-root".into(), OsString::from(&c.storage_root)]);
    }
    if let Some(p) = permissions_file {
        args.extend(["--permissions-file".into(), p.into()]);
    }
    args.push(OsString::from(&c.session_id));
    Ok(args)
}

/// `get-screenshot`'s argv; DCV spells the formats `PNG` and `JPEG`.
/// `--primary`: the primary display alone (without it DCV merges every
/// display into one image), which is what Session Manager's `Primary` image
/// is.
pub fn screenshot_argv(
    id: &str,
    max_width: i32,
    max_height: i32,
    format: &str,
) -> Result<Vec<OsString>, DcvError> {
    let format = match format.to_ascii_lowercase().as_str() {
        "jpeg" | "jpg" => "JPEG",
        "png" | "" => "PNG",
        _ => {
            return Err(DcvError::Refused(format!(
                "unknown screenshot format {format:?}: png or jpeg"
            )));
        }
    };
    let mut args = argv(&["get-screenshot"]);
    if max_width > 0 {
        args.extend(["--max-width".into(), max_width.to_string().into()]);
    }
    if max_height > 0 {
        args.extend(["--max-height".into(), max_height.to_string().into()]);
    }
    args.extend([
        "--format".into(),
        format.into(),
        "--primary".into(),
        "--json".into(),
        id.into(),
    ]);
    Ok(args)
}

/// `folder/relative`, refusing anything that could leave `folder`:
/// absolute paths, `..`, and empty names.
pub fn confine(folder: &Path, relative: &str) -> Result<PathBuf, String> {
    let rel = Path::new(relative);
    if relative.is_empty() || relative.contains('\0') {
        return Err(format!("{relative:?} is not a file name"));
    }
    for part in rel.components() {
        match part {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(format!(
                    "{relative:?} must be a relative path inside {} (no .. or absolute paths)",
                    folder.display()
                ));
            }
        }
    }
    Ok(folder.join(rel))
}

/// A private (0600) temporary file holding a decoded permissions file,
/// removed when dropped.
#[derive(Debug)]
pub struct PrivateFile(PathBuf);

impl PrivateFile {
    pub fn write(dir: &Path, bytes: &[u8]) -> std::io::Result<PrivateFile> {
        let path = dir.join(format!("permissions-{}.txt", uuid::Uuid::new_v4()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let file = PrivateFile(path);
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A base64 permissions file from an instruction, decoded.
pub fn decode_permissions(base64_text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(base64_text.trim())
        .map_err(|e| format!("the permissions file is not base64: {e}"))
}

/// `list-sessions --json`: an array of sessions (or an object holding one
/// under `sessions`), each as `describe-session --json` shows it.
pub fn parse_session_list(out: &[u8]) -> Result<Vec<DcvSession>, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| format!("not JSON: {e}"))?;
    let items = match &v {
        Value::Array(items) => items,
        Value::Object(o) => match o.get("sessions") {
            Some(Value::Array(items)) => items,
            _ => return Err("no list of sessions".into()),
        },
        _ => return Err("no list of sessions".into()),
    };
    Ok(items.iter().filter_map(parse_session).collect())
}

/// One session object; `None` without an id.
pub fn parse_session(v: &Value) -> Option<DcvSession> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let id = text("id");
    if id.is_empty() {
        return None;
    }
    let kind = match text("type").to_ascii_lowercase().as_str() {
        "console" => pb::SessionType::Console,
        "virtual" => pb::SessionType::Virtual,
        _ => pb::SessionType::Unspecified,
    };
    let time = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .and_then(|s| {
                humantime::parse_rfc3339(s)
                    .or_else(|_| humantime::parse_rfc3339_weak(s))
                    .ok()
            })
    };
    Some(DcvSession {
        owner: text("owner"),
        name: text("name"),
        kind,
        num_of_connections: v
            .get("num-of-connections")
            .and_then(Value::as_i64)
            .map(|n| n.clamp(0, i64::from(i32::MAX)) as i32),
        creation_time: time("creation-time"),
        last_disconnection_time: time("last-disconnection-time"),
        id,
    })
}

/// `get-screenshot --json`: DCV documents the output only as "base64 in
/// JSON", so this takes an object with the image under `base64` (the key
/// Amazon's Research and Engineering Studio reads from the real tool), or
/// `data`, `image`, `screenshot`, with optional `format` and `primary`; a
/// list of them; or an object holding the list under `images` or
/// `screenshots`.
pub fn parse_screenshot(
    out: &[u8],
    requested_format: &str,
) -> Result<Vec<pb::SessionScreenshotImage>, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| format!("not JSON: {e}"))?;
    let items: Vec<&Value> = match &v {
        Value::Array(items) => items.iter().collect(),
        Value::Object(o) => match o.get("images").or_else(|| o.get("screenshots")) {
            Some(Value::Array(items)) => items.iter().collect(),
            _ => vec![&v],
        },
        _ => return Err("not a screenshot".into()),
    };
    let now = prost_types::Timestamp::from(SystemTime::now());
    let mut images = Vec::new();
    let mut total = 0;
    for (i, item) in items.iter().take(MAX_SCREENSHOT_IMAGES).enumerate() {
        let data = ["base64", "data", "image", "screenshot"]
            .iter()
            .find_map(|k| item.get(*k).and_then(Value::as_str))
            .ok_or("no image data in the output")?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("the image is not base64: {e}"))?;
        total += bytes.len();
        if total > MAX_SCREENSHOT_BYTES {
            return Err(format!("images larger than {MAX_SCREENSHOT_BYTES} bytes"));
        }
        let format = item
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or(requested_format)
            .to_ascii_lowercase();
        let format = if format == "jpg" {
            "jpeg".into()
        } else {
            format
        };
        images.push(pb::SessionScreenshotImage {
            format,
            data: bytes,
            creation_time: Some(now),
            primary: item
                .get("primary")
                .and_then(Value::as_bool)
                .unwrap_or(i == 0),
        });
    }
    if images.is_empty() {
        return Err("no image in the output".into());
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DCV's "Finding and stopping idle sessions" page.
    const DESCRIBE_EXAMPLE: &str = r#"{
      "id" : "my-session",
      "owner" : "dcvuser",
      "x11-display" : ":1",
      "x11-authority" : "/run/user/1009/dcv/test3.xauth",
      "num-of-connections" : 1,
      "creation-time" : "2019-05-13T13:21:19.262883Z",
      "last-disconnection-time" : "2019-05-14T12:32:14.357567Z",
      "licensing-mode" : "DEMO",
      "licenses" : [ { "product" : "dcv", "status" : "LICENSED" } ]
    }"#;

    fn folders() -> Folders {
        Folders {
            init: "/etc/agent/init".into(),
            autorun: "/etc/agent/autorun".into(),
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn dcvs_documented_describe_output_parses() {
        let v: Value = serde_json::from_str(DESCRIBE_EXAMPLE).unwrap();
        let s = parse_session(&v).unwrap();
        assert_eq!(s.id, "my-session");
        assert_eq!(s.owner, "dcvuser");
        assert_eq!(s.num_of_connections, Some(1));
        assert_eq!(
            s.creation_time.unwrap(),
            humantime::parse_rfc3339("2019-05-13T13:21:19.262883Z").unwrap()
        );
        assert!(s.last_disconnection_time.is_some());
        let list = format!(
            "[{DESCRIBE_EXAMPLE}, {{\"id\":\"b\",\"type\":\"console\",\"last-disconnection-time\":null}}, {{\"no\":1}}]"
        );
        let all = parse_session_list(list.as_bytes()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].kind, pb::SessionType::Console);
        assert_eq!(all[1].last_disconnection_time, None);
        assert!(parse_session_list(b"{}").is_err());
        assert!(parse_session_list(b"Session: x").is_err());
    }

    #[test]
    fn create_session_argv_follows_dcvs_flags() {
        let c = pb::CreateSessionInstruction {
            session_id: "s-1".into(),
            name: "my desk".into(),
            owner: "alice".into(),
            r#type: pb::SessionType::Virtual as i32,
            init_file: "team/start.sh".into(),
            max_concurrent_clients: 2,
            dcv_gl_enabled: true,
            storage_root: "%home%/files".into(),
            ..Default::default()
        };
        let args = create_session_argv(&c, &folders(), Some(Path::new("/s/p.txt"))).unwrap();
        assert_eq!(
            strings(&args),
            [
                "create-session",
                "--type",
                "virtual",
                "--owner",
                "alice",
                "--name",
                "my desk",
                "--user",
                "alice",
                "--init",
                "/etc/agent/init/team/start.sh",
                "--max-concurrent-clients",
                "2",
                "--gl",
                "on",
                "--storage-root",
                "%home%/files",
                "--permissions-file",
                "/s/p.txt",
                "s-1"
            ]
        );
        let console = pb::CreateSessionInstruction {
            session_id: "c".into(),
            owner: "bob".into(),
            r#type: pb::SessionType::Console as i32,
            ..Default::default()
        };
        assert_eq!(
            strings(&create_session_argv(&console, &folders(), None).unwrap()),
            [
                "create-session",
                "--type",
                "console",
                "--owner",
                "bob",
                "--name",
                "",
                "c"
            ]
        );
        let mut bad = c.clone();
        bad.init_file = "../../bin/sh".into();
        assert!(
            create_session_argv(&bad, &folders(), None)
                .unwrap_err()
                .contains("InitFile")
        );
        bad.init_file = "/bin/sh".into();
        assert!(create_session_argv(&bad, &folders(), None).is_err());
        for field in ["owner", "name", "storage_root", "session_id"] {
            let mut bad = c.clone();
            let value = "--help".to_owned();
            match field {
                "owner" => bad.owner = value,
                "name" => bad.name = value,
                "storage_root" => bad.storage_root = value,
                _ => bad.session_id = value,
            }
            let e = create_session_argv(&bad, &folders(), None).unwrap_err();
            assert!(e.contains("invalid"), "{field}: {e}");
        }
        let mut bad = c;
        bad.autorun_file = "../x".into();
        assert!(
            create_session_argv(&bad, &folders(), None)
                .unwrap_err()
                .contains("AutorunFile")
        );
    }

    #[test]
    fn paths_stay_inside_their_folder() {
        let f = Path::new("/srv/init");
        assert_eq!(confine(f, "a/b.sh").unwrap(), Path::new("/srv/init/a/b.sh"));
        assert_eq!(confine(f, "./a.sh").unwrap(), Path::new("/srv/init/a.sh"));
        for bad in ["../a", "a/../../b", "/etc/passwd", "", "a\0b"] {
            assert!(confine(f, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn screenshot_outputs_parse_and_are_bounded() {
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nxx");
        let one = format!(r#"{{"format":"png","primary":true,"base64":"{png}"}}"#);
        let images = parse_screenshot(one.as_bytes(), "png").unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].format, "png");
        assert!(images[0].primary);
        assert!(images[0].data.starts_with(b"\x89PNG"));
        let many =
            format!(r#"{{"images":[{{"data":"{png}","primary":false}},{{"image":"{png}"}}]}}"#);
        let images = parse_screenshot(many.as_bytes(), "jpeg").unwrap();
        assert_eq!(images.len(), 2);
        assert!(!images[0].primary && !images[1].primary);
        assert_eq!(images[1].format, "jpeg");
        assert!(parse_screenshot(b"{\"data\":\"!!\"}", "png").is_err());
        assert!(parse_screenshot(b"[]", "png").is_err());
        assert_eq!(
            strings(&screenshot_argv("s", 160, 100, "jpeg").unwrap()),
            [
                "get-screenshot",
                "--max-width",
                "160",
                "--max-height",
                "100",
                "--format",
                "JPEG",
                "--primary",
                "--json",
                "s"
            ]
        );
    }

    #[test]
    fn permissions_files_are_private_and_removed_after_use() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("agent-perm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bytes = decode_permissions("W3Blcm1pc3Npb25zXQo=").unwrap();
        let file = PrivateFile::write(&dir, &bytes).unwrap();
        let path = file.path().to_owned();
        assert_eq!(fs::read(&path).unwrap(), b"[permissions]\n");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(file);
        assert!(!path.exists());
        assert!(decode_permissions("not base64!").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn ids_and_formats_that_could_read_as_options_are_refused_before_running() {
        // A command that would succeed: nothing may reach it.
        let dcv = Dcv::new("true".into(), Duration::from_secs(5));
        for id in ["-h", "--help", "", "a\nb"] {
            assert!(
                matches!(dcv.close_session(id).await, Err(DcvError::Refused(_))),
                "{id:?}"
            );
            assert!(matches!(
                dcv.describe_session(id).await,
                Err(DcvError::Refused(_))
            ));
            assert!(matches!(
                dcv.set_permissions(id, Path::new("/p")).await,
                Err(DcvError::Refused(_))
            ));
        }
        assert!(matches!(
            dcv.get_screenshot("s", 1, 1, "gif").await,
            Err(DcvError::Refused(_))
        ));
        assert!(dcv.close_session("ok-id").await.is_ok());
    }

    #[test]
    fn reasons_are_one_bounded_line() {
        assert_eq!(
            reason_from(b"  error: no\n\nsuch session \x07\n"),
            "error: no; such session"
        );
        assert_eq!(reason_from(&[b'x'; 2000]).len(), MAX_REASON_CHARS);
    }

    #[tokio::test]
    async fn a_hung_child_is_killed_at_the_timeout() {
        let dcv = Dcv::new("sleep".into(), Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = dcv.run(&["30".into()]).await.unwrap_err();
        assert!(matches!(e, DcvError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_flood_of_output_is_bounded_and_does_not_block_the_child() {
        let sh = Dcv::new("sh".into(), Duration::from_secs(20));
        // 1 MiB of stderr, then a failure: the reason is bounded, and the
        // child was not stuck on a full pipe.
        let e = sh
            .run(&[
                "-c".into(),
                "head -c 1048576 /dev/zero | tr '\\0' x >&2; exit 1".into(),
            ])
            .await
            .unwrap_err();
        match e {
            DcvError::Failed { reason, .. } => assert_eq!(reason.len(), MAX_REASON_CHARS),
            other => panic!("{other}"),
        }
        let e = sh
            .run(&[
                "-c".into(),
                format!("head -c {} /dev/zero", MAX_STDOUT_BYTES + 10).into(),
            ])
            .await
            .unwrap_err();
        assert!(matches!(e, DcvError::BadOutput { .. }), "{e}");
    }

    #[tokio::test]
    async fn stderr_becomes_the_reason_and_stdout_the_answer() {
        let sh = Dcv::new("sh".into(), Duration::from_secs(10));
        let e = sh
            .run(&["-c".into(), "echo 'no such session' >&2; exit 3".into()])
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "dcv -c: no such session");
        let out = sh.run(&["-c".into(), "echo '[]'".into()]).await.unwrap();
        assert_eq!(parse_session_list(&out).unwrap(), vec![]);
        let missing = Dcv::new("/nonexistent/dcv".into(), Duration::from_secs(1));
        assert!(matches!(
            missing.list_sessions().await,
            Err(DcvError::Spawn { .. })
        ));
    }
}
