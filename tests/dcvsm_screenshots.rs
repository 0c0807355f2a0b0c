//! `dcvsm get-session-screenshots` against the real `dcv-broker` binary
//! with its simulated fleet: the simulated agent's PNG is saved, private
//! (mode 0600) and decodable, the reply names the file instead of the
//! data, failures are listed (exit 3), and a symlink planted at the file's
//! path is replaced, not followed.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::process::BrokerProcess;
use serde_json::Value;

const DCVSM: &str = env!("CARGO_BIN_EXE_dcvsm");

/// dcvsm against `url`, isolated from the user's configuration.
fn dcvsm(url: &str, home: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(DCVSM);
    for var in [
        "DCV_SM_BROKER_URL",
        "DCV_SM_AUTH_SERVER_URL",
        "DCV_SM_CLIENT_ID",
        "DCV_SM_CLIENT_PASSWORD",
        "DCV_SM_OAUTH2_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("XDG_CONFIG_HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HOME", home)
        .arg("--broker-url")
        .arg(url)
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dcvsm-shots-{}-{name}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn get_session_screenshots_saves_private_decodable_pngs() {
    let mut broker = BrokerProcess::start_exactly(&["--in-memory", "--demo-fleet", "3"]).await;
    let _ = broker.logged("demo fleet registered").await;
    let url = format!("http://{}", broker.addr);
    let home = fresh("home");
    let created = json(&dcvsm(
        &url,
        &home,
        &[
            "create-session",
            "--name",
            "shot",
            "--owner",
            "alice",
            "--type",
            "VIRTUAL",
        ],
    ));
    let id = created["SuccessfulList"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The simulated agent creates it at once; polled, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let described = json(&dcvsm(
            &url,
            &home,
            &["describe-sessions", "--session-ids", &id],
        ));
        if described["Sessions"][0]["State"] == "READY" {
            break;
        }
        assert!(Instant::now() < deadline, "not READY: {described}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let dir = fresh("out");
    // A symlink where the file goes: replaced, never written through.
    let target = dir.join("elsewhere");
    std::fs::write(&target, "untouched").unwrap();
    let expected = dir.join(format!("{id}-0.png"));
    std::os::unix::fs::symlink(&target, &expected).unwrap();

    let out = dcvsm(
        &url,
        &home,
        &[
            "get-session-screenshots",
            "--session-ids",
            &format!("{id},missing"),
            "--max-width",
            "320",
            "--max-height",
            "320",
            "--output-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "one item failed");
    let reply = json(&out);
    let image = &reply["SuccessfulList"][0]["SessionScreenshot"]["Images"][0];
    assert_eq!(image["File"], expected.to_str().unwrap());
    assert!(
        image.get("Data").is_none(),
        "the data is in the file: {image}"
    );
    assert_eq!(image["Format"], "png");
    assert_eq!(image["Primary"], true);
    assert_eq!(
        reply["UnsuccessfulList"][0]["FailureCode"], "SESSION_NOT_FOUND",
        "{reply}"
    );

    let meta = std::fs::symlink_metadata(&expected).unwrap();
    assert!(meta.file_type().is_file(), "a file, not the symlink");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&expected).unwrap(),
    ));
    let reader = decoder.read_info().unwrap();
    // The simulated 1280x800 display, scaled to fit 320x320.
    assert_eq!((reader.info().width, reader.info().height), (320, 200));

    // Bad sizes are refused before any call.
    let out = dcvsm(
        &url,
        &home,
        &[
            "get-session-screenshots",
            "--session-ids",
            &id,
            "--max-width",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(252));
    broker.terminate().await;
}
