//! The fake `dcv` of tests/fixtures on its own: it accepts what DCV's
//! Administrator Guide documents, refuses what DCV's tool refuses, and
//! prints DCV's `--json` shapes, so that the agent's end-to-end tests
//! exercise the agent against the documented tool and not against a
//! fixture that says yes to anything.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use base64::Engine;

const FAKE_DCV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-dcv");

/// A fake dcv's state directory, removed when dropped.
struct State(PathBuf);

impl State {
    fn new() -> State {
        let dir = std::env::temp_dir().join(format!("fake-dcv-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        State(dir)
    }

    fn dcv(&self, args: &[&str]) -> Output {
        Command::new(FAKE_DCV)
            .args(args)
            .env("FAKE_DCV_STATE", &self.0)
            .output()
            .expect("the fake dcv runs (python3)")
    }

    /// Runs `dcv args`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.dcv(args);
        assert!(
            out.status.success(),
            "dcv {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `dcv args`, which must fail with one line on stderr; that line.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.dcv(args);
        assert!(!out.status.success(), "dcv {args:?} should fail");
        assert!(out.stdout.is_empty(), "nothing on stdout when refused");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        err.trim_end().to_string()
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for State {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn create_session_takes_the_documented_flags_and_describe_session_prints_dcv_json() {
    let state = State::new();
    let perms = state.path().join("perm.txt");
    std::fs::write(&perms, "[permissions]\n%owner% allow builtin\n").unwrap();
    state.ok(&[
        "create-session",
        "--type",
        "virtual",
        "--name",
        "design review",
        "--user",
        "alice",
        "--owner",
        "alice",
        "--permissions-file",
        perms.to_str().unwrap(),
        "--storage-root",
        "/srv/storage",
        "--gl",
        "on",
        "--max-concurrent-clients",
        "3",
        "s-1",
    ]);
    let described: serde_json::Value =
        serde_json::from_str(&state.ok(&["describe-session", "s-1", "--json"])).unwrap();
    assert_eq!(described["id"], "s-1");
    assert_eq!(described["owner"], "alice");
    assert_eq!(described["name"], "design review");
    assert_eq!(described["type"], "virtual");
    assert_eq!(described["num-of-connections"], 0);
    assert_eq!(described["storage-root"], "/srv/storage");
    assert_eq!(
        described["last-disconnection-time"], "",
        "DCV's value before any disconnection"
    );
    let created = described["creation-time"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    assert!(
        described.get("fake-options").is_none(),
        "only DCV's keys are printed"
    );
    // -j is the short form; list-sessions --json is an array of the same objects.
    let short: serde_json::Value =
        serde_json::from_str(&state.ok(&["describe-session", "-j", "s-1"])).unwrap();
    assert_eq!(short, described);
    let listed: serde_json::Value =
        serde_json::from_str(&state.ok(&["list-sessions", "--json"])).unwrap();
    assert_eq!(listed, serde_json::json!([described]));
    // The permissions file was read when the session was created.
    let kept = std::fs::read_to_string(state.path().join("permissions/s-1")).unwrap();
    assert!(kept.contains("%owner% allow builtin"));
    // The call was logged as a JSON array of argv.
    let log = std::fs::read_to_string(state.path().join("calls.log")).unwrap();
    let first: Vec<String> = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first.first().map(String::as_str), Some("create-session"));
    assert_eq!(first.last().map(String::as_str), Some("s-1"));
}

#[test]
fn the_fake_refuses_what_dcv_refuses() {
    let state = State::new();
    state.ok(&[
        "create-session",
        "--type",
        "virtual",
        "--owner",
        "bob",
        "dup",
    ]);
    let duplicate = state.refused(&[
        "create-session",
        "--type",
        "virtual",
        "--owner",
        "bob",
        "dup",
    ]);
    assert!(duplicate.contains("already exists"), "{duplicate}");
    let unknown = state.refused(&["create-session", "--typo", "virtual", "x"]);
    assert!(unknown.contains("--typo"), "{unknown}");
    let missing = state.refused(&["create-session", "--type", "virtual"]);
    assert!(missing.contains("session ID"), "{missing}");
    state.refused(&["create-session", "--type", "desktop", "x"]);
    state.refused(&["create-session", "--gl", "maybe", "x"]);
    state.refused(&["create-session", "--max-concurrent-clients", "0", "x"]);
    state.refused(&["create-session", "--max-concurrent-clients", "101", "x"]);
    state.refused(&["create-session", "--init", "/nonexistent/init.sh", "x"]);
    state.refused(&["create-session", "--name"]);
    let gone = state.refused(&["close-session", "nope"]);
    assert!(gone.contains("nope"), "{gone}");
    state.refused(&["describe-session", "nope", "--json"]);
    state.refused(&["set-permissions", "--session", "dup"]);
    state.refused(&[
        "set-permissions",
        "--session",
        "dup",
        "--none",
        "--reset-builtin",
    ]);
    state.refused(&["frobnicate"]);
    // One console session at a time.
    state.ok(&[
        "create-session",
        "--type",
        "console",
        "--owner",
        "bob",
        "c1",
    ]);
    state.refused(&[
        "create-session",
        "--type",
        "console",
        "--owner",
        "bob",
        "c2",
    ]);
}

#[test]
fn close_session_and_set_permissions_change_the_state() {
    let state = State::new();
    state.ok(&[
        "create-session",
        "--type",
        "virtual",
        "--owner",
        "carol",
        "s",
    ]);
    state.ok(&["set-permissions", "--session", "s", "--none"]);
    assert_eq!(
        std::fs::read_to_string(state.path().join("permissions/s")).unwrap(),
        "#none\n"
    );
    let file = state.path().join("p");
    std::fs::write(&file, "[permissions]\ncarol allow display\n").unwrap();
    state.ok(&[
        "set-permissions",
        "--session",
        "s",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read_to_string(state.path().join("permissions/s"))
            .unwrap()
            .contains("carol allow display")
    );
    state.ok(&["close-session", "s"]);
    assert_eq!(state.ok(&["list-sessions", "--json"]).trim(), "[]");
}

#[test]
fn get_screenshot_json_is_a_base64_png_within_the_bounds() {
    let state = State::new();
    state.ok(&[
        "create-session",
        "--type",
        "virtual",
        "--owner",
        "dave",
        "s",
    ]);
    let out = state.ok(&[
        "get-screenshot",
        "--max-width",
        "200",
        "--max-height",
        "100",
        "--format",
        "PNG",
        "--json",
        "s",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["format"], "png");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(json["base64"].as_str().unwrap())
        .unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("a PNG");
    let info = reader.info();
    assert!(
        info.width <= 200 && info.height <= 100,
        "{}x{}",
        info.width,
        info.height
    );
    assert!(info.width > 0 && info.height > 0);
    // --output writes the same kind of file.
    let file = state.path().join("shot.png");
    state.ok(&["get-screenshot", "--output", file.to_str().unwrap(), "s"]);
    assert!(
        std::fs::read(&file)
            .unwrap()
            .starts_with(b"\x89PNG\r\n\x1a\n")
    );
    state.refused(&["get-screenshot", "--json", "missing"]);
    state.refused(&["get-screenshot", "--max-width", "0", "--json", "s"]);
}

#[test]
fn switch_files_make_a_command_fail_or_hang() {
    let state = State::new();
    std::fs::write(
        state.path().join("fail-create-session"),
        "no licenses available\n",
    )
    .unwrap();
    let why = state.refused(&[
        "create-session",
        "--type",
        "virtual",
        "--owner",
        "erin",
        "s",
    ]);
    assert_eq!(why, "no licenses available");
    std::fs::remove_file(state.path().join("fail-create-session")).unwrap();

    // A hung command returns once its switch is gone.
    let hang = state.path().join("hang-close-session");
    std::fs::write(&hang, "").unwrap();
    let mut child = Command::new(FAKE_DCV)
        .args(["close-session", "s"])
        .env("FAKE_DCV_STATE", state.path())
        .spawn()
        .unwrap();
    // The call is logged before it hangs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(state.path().join("calls.log"))
        .unwrap_or_default()
        .contains("close-session")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hung call is logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "still hanging");
    std::fs::remove_file(&hang).unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "then fails as DCV would: there is no session s"
    );
}
