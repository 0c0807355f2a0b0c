//! The committed seed corpus (`fuzz/corpus/<target>/`): a few valid and
//! nearly valid inputs per RPC that name the fixture's servers and
//! sessions, and Requirements from the language's documentation. They
//! give the fuzzer every message's shape at once; libFuzzer mutates from
//! there. `examples/write_seeds.rs` writes them.

use dcv_broker::pb;

use crate::{
    fixture::{self, adopted_session_id, create_item, server_id},
    rpc::Rpc,
};

/// A seed: its file name (without directory) and its bytes.
pub type Seed = (String, Vec<u8>);

fn kv(key: &str, value: &str) -> pb::KeyValuePair {
    pb::KeyValuePair {
        key: key.into(),
        value: value.into(),
    }
}

fn close(id: &str, force: Option<bool>, reason: &str) -> pb::CloseServerRequestData {
    pb::CloseServerRequestData {
        server_id: id.into(),
        force,
        reason: reason.into(),
        ..Default::default()
    }
}

fn open(ids: &[&str]) -> pb::OpenServersRequest {
    pb::OpenServersRequest {
        servers: ids
            .iter()
            .map(|id| pb::OpenServerRequestData {
                server_id: id.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn delete(id: &str, owner: &str, force: Option<bool>) -> pb::DeleteSessionRequestData {
    pb::DeleteSessionRequestData {
        session_id: id.into(),
        owner: owner.into(),
        force,
    }
}

fn report(
    server: usize,
    session: &str,
    kind: pb::InstructionKind,
    success: bool,
    state: pb::SessionState,
) -> pb::ReportInstructionResultRequest {
    pb::ReportInstructionResultRequest {
        server_id: server_id(server),
        session_id: session.into(),
        kind: kind as i32,
        success,
        failure_reason: if success { "" } else { "no such user" }.into(),
        session_state: state as i32,
        ..Default::default()
    }
}

/// The `requests` target's seeds, named `<Rpc>-<n>`.
pub fn requests() -> Vec<Seed> {
    let mut seeds: Vec<(Rpc, Vec<u8>)> = Vec::new();
    let mut add = |rpc: Rpc, message: &dyn Fn() -> Vec<u8>| seeds.push((rpc, message()));
    let s1 = adopted_session_id(1);
    let s3 = adopted_session_id(3);

    // Servers.
    add(Rpc::CloseServers, &|| {
        Rpc::CloseServers.input(&pb::CloseServersRequest {
            servers: vec![close("srv-07", None, ""), close("srv-99", None, "")],
            ..Default::default()
        })
    });
    add(Rpc::CloseServers, &|| {
        Rpc::CloseServers.input(&pb::CloseServersRequest {
            servers: vec![close("srv-01", Some(true), "kernel patch, CHG-1234")],
            ..Default::default()
        })
    });
    add(Rpc::CloseServers, &|| {
        Rpc::CloseServers.input(&pb::CloseServersRequest {
            servers: vec![
                close("srv-02", Some(false), ""),
                close("srv-02", None, ""),
                close("", None, ""),
                close("srv-03", None, "bad\u{1}reason"),
            ],
            ..Default::default()
        })
    });
    add(Rpc::OpenServers, &|| {
        Rpc::OpenServers.input(&open(&["srv-04", "srv-05"]))
    });
    add(Rpc::OpenServers, &|| {
        Rpc::OpenServers.input(&open(&["srv-00", "nope", "srv-00", ""]))
    });
    add(Rpc::DescribeServers, &|| {
        Rpc::DescribeServers.input(&pb::DescribeServersRequest::default())
    });
    add(Rpc::DescribeServers, &|| {
        Rpc::DescribeServers.input(&pb::DescribeServersRequest {
            server_ids: vec!["srv-02".into(), "srv-01".into(), "srv-99".into()],
            max_results: Some(1),
            ..Default::default()
        })
    });
    add(Rpc::DescribeServers, &|| {
        Rpc::DescribeServers.input(&pb::DescribeServersRequest {
            filters: vec![
                kv("closed", "true"),
                kv("availability", "UNAVAILABLE"),
                kv("unavailability-reason", "SERVER_CLOSED"),
            ],
            ..Default::default()
        })
    });
    add(Rpc::DescribeServers, &|| {
        Rpc::DescribeServers.input(&pb::DescribeServersRequest {
            filters: vec![
                kv("os-family", "linux"),
                kv("tag:city", "London"),
                kv("tag:dcv:os-family", "linux"),
            ],
            max_results: Some(3),
            next_token: "not-a-token".into(),
            ..Default::default()
        })
    });

    // Sessions.
    add(Rpc::CreateSessions, &|| {
        Rpc::CreateSessions.input(&pb::CreateSessionsRequest {
            sessions: vec![create_item("desk", "alice", pb::SessionType::Virtual)],
            ..Default::default()
        })
    });
    add(Rpc::CreateSessions, &|| {
        let mut console = create_item("win", "bob", pb::SessionType::Console);
        console.requirements = "server:Host.Os.Family = 'windows' and not tag:gpu = 'true'".into();
        console.max_concurrent_clients = Some(2);
        console.permissions_file = "JW93bmVyJSBhbGxvdyBidWlsdGluCg==".into();
        let mut queued = create_item("later", "carol", pb::SessionType::Virtual);
        queued.requirements = "tag:city = 'Tokyo' or server:Host.Memory.TotalBytes > 1e12".into();
        queued.enqueue_request = true;
        Rpc::CreateSessions.input(&pb::CreateSessionsRequest {
            sessions: vec![console, queued],
            ..Default::default()
        })
    });
    add(Rpc::CreateSessions, &|| {
        let mut full = create_item("full", "dave", pb::SessionType::Virtual);
        full.init_file = "/etc/dcv/init.sh".into();
        full.autorun_file = "/usr/bin/xterm".into();
        full.autorun_file_arguments = vec!["-e".into(), "top".into()];
        full.dcv_gl_enabled = true;
        full.disable_retry_on_failure = true;
        full.storage_root = "%home%/storage".into();
        full.requirements =
            "server:Host.Aws.Region := 'eu' and server:Host.CpuLoadAverage.OneMinute <= 0.5".into();
        let mut bad = create_item("", "", pb::SessionType::Unspecified);
        bad.requirements = "tag:a = (".into();
        bad.max_concurrent_clients = Some(1000);
        bad.permissions_file = "not base64!".into();
        Rpc::CreateSessions.input(&pb::CreateSessionsRequest {
            sessions: vec![full, bad],
            ..Default::default()
        })
    });
    add(Rpc::DescribeSessions, &|| {
        Rpc::DescribeSessions.input(&pb::DescribeSessionsRequest::default())
    });
    add(Rpc::DescribeSessions, &|| {
        Rpc::DescribeSessions.input(&pb::DescribeSessionsRequest {
            session_ids: vec![s3.clone(), s1.clone(), "sess-00-b".into(), "nope".into()],
            max_results: Some(2),
            ..Default::default()
        })
    });
    add(Rpc::DescribeSessions, &|| {
        Rpc::DescribeSessions.input(&pb::DescribeSessionsRequest {
            filters: vec![
                kv("owner", "alice"),
                kv("state", "READY"),
                kv("tag:city", "Paris"),
            ],
            ..Default::default()
        })
    });
    add(Rpc::DeleteSessions, &|| {
        Rpc::DeleteSessions.input(&pb::DeleteSessionsRequest {
            sessions: vec![delete(&s1, "alice", None), delete("nope", "alice", None)],
            ..Default::default()
        })
    });
    add(Rpc::DeleteSessions, &|| {
        Rpc::DeleteSessions.input(&pb::DeleteSessionsRequest {
            sessions: vec![
                delete(&s3, "carol", Some(true)),
                delete(&s3, "carol", Some(true)),
                delete("sess-00-b", "mallory", None),
                delete("", "", None),
            ],
            ..Default::default()
        })
    });
    add(Rpc::GetSessionConnectionData, &|| {
        Rpc::GetSessionConnectionData.input(&pb::GetSessionConnectionDataRequest {
            session_id: s1.clone(),
            user: "alice".into(),
        })
    });
    add(Rpc::GetSessionConnectionData, &|| {
        Rpc::GetSessionConnectionData.input(&pb::GetSessionConnectionDataRequest {
            session_id: "sess-00-b".into(),
            user: "bob".into(),
        })
    });
    add(Rpc::UpdateSessionPermissions, &|| {
        Rpc::UpdateSessionPermissions.input(&pb::UpdateSessionPermissionsRequest {
            sessions: vec![
                pb::UpdateSessionPermissionsRequestData {
                    session_id: s1.clone(),
                    owner: "alice".into(),
                    permissions_file: "JW93bmVyJSBhbGxvdyBidWlsdGluCg==".into(),
                },
                pb::UpdateSessionPermissionsRequestData {
                    session_id: "nope".into(),
                    owner: "alice".into(),
                    permissions_file: "***".into(),
                },
            ],
            ..Default::default()
        })
    });

    add(Rpc::GetSessionScreenshots, &|| {
        Rpc::GetSessionScreenshots.input(&pb::GetSessionScreenshotsRequest {
            sessions: vec![
                pb::GetSessionScreenshotRequestData {
                    session_id: s1.clone(),
                    max_width: Some(320),
                    max_height: None,
                },
                pb::GetSessionScreenshotRequestData {
                    session_id: "sess-00-b".into(),
                    ..Default::default()
                },
                pb::GetSessionScreenshotRequestData {
                    session_id: s1.clone(),
                    max_width: Some(5000),
                    max_height: Some(0),
                },
            ],
        })
    });

    // Agent.
    add(Rpc::RegisterServer, &|| {
        Rpc::RegisterServer.input(&fixture::registration(fixture::SERVERS + 8))
    });
    add(Rpc::RegisterServer, &|| {
        Rpc::RegisterServer.input(&fixture::registration(1))
    });
    add(Rpc::RegisterServer, &|| {
        let mut bad = fixture::registration(3);
        bad.server_id = String::new();
        bad.max_virtual_sessions = -1;
        bad.endpoints[0].protocol = 7;
        Rpc::RegisterServer.input(&bad)
    });
    add(Rpc::Heartbeat, &|| {
        Rpc::Heartbeat.input(&fixture::heartbeat(1))
    });
    add(Rpc::Heartbeat, &|| {
        let mut beat = fixture::heartbeat(2);
        beat.sessions.clear();
        beat.dcv_server_healthy = false;
        beat.logged_in_users = vec![pb::LoggedInUser {
            username: "rdp-user".into(),
        }];
        Rpc::Heartbeat.input(&beat)
    });
    add(Rpc::Heartbeat, &|| {
        let mut beat = fixture::heartbeat(3);
        beat.sessions.push(fixture::agent_session(
            "sess-03-z".into(),
            "zed",
            pb::SessionType::Virtual,
            pb::SessionState::Deleting,
        ));
        Rpc::Heartbeat.input(&beat)
    });
    add(Rpc::DeregisterServer, &|| {
        Rpc::DeregisterServer.input(&pb::DeregisterServerRequest {
            server_id: server_id(2),
        })
    });
    add(Rpc::DeregisterServer, &|| {
        Rpc::DeregisterServer.input(&pb::DeregisterServerRequest {
            server_id: "nope".into(),
        })
    });
    for i in [0, 7, 15] {
        add(Rpc::StreamInstructions, &|| {
            Rpc::StreamInstructions.input(&pb::StreamInstructionsRequest {
                server_id: server_id(i),
            })
        });
    }
    add(Rpc::ReportInstructionResult, &|| {
        Rpc::ReportInstructionResult.input(&report(
            0,
            "sess-00-b",
            pb::InstructionKind::CreateSession,
            true,
            pb::SessionState::Ready,
        ))
    });
    add(Rpc::ReportInstructionResult, &|| {
        Rpc::ReportInstructionResult.input(&report(
            1,
            &s1,
            pb::InstructionKind::DeleteSession,
            false,
            pb::SessionState::Unspecified,
        ))
    });
    add(Rpc::ValidateConnectionToken, &|| {
        Rpc::ValidateConnectionToken.input(&pb::ValidateConnectionTokenRequest {
            server_id: server_id(1),
            connection_token: "eyJub3QiOiJhIHRva2VuIn0.c2lnbmF0dXJl".into(),
            session_id: s1.clone(),
        })
    });

    let mut numbered: Vec<Seed> = Vec::new();
    for (rpc, bytes) in seeds {
        let n = numbered
            .iter()
            .filter(|(name, _)| name.starts_with(&format!("{}-", rpc.name())))
            .count();
        numbered.push((format!("{}-{n}", rpc.name()), bytes));
    }
    numbered
}

/// The `requirements` target's seeds: the documentation's examples and a
/// few errors.
pub fn requirements() -> Vec<Seed> {
    [
        "tag:color = 'pink'",
        "server:Host.Os.Family = 'windows' and tag:gpu = 'true'",
        "(tag:a = 'x')or(tag:b = 'y')",
        "not not tag:gpu = 'true'",
        "tag:'my key' != 'o''neil'",
        "tag:dcv:os-family = 'linux' AND tag:dcv:max-virtual-sessions >= 2",
        "server:Host.CpuLoadAverage.OneMinute <= 0.1 or server:Host.Memory.TotalBytes > 1024E6",
        "server:Host.Aws.EC2InstanceType := 'g4dn' and server:Host.Aws.Region = 'eu-west-1'",
        "server:Host.CpuInfo.NumberOfCpus >= +2.5e-3 and server:Id < 'srv-10'",
        "server:Hostname := 1e3",
        "tag:a = 'unterminated",
        "tag:a = .5",
        "server:Host.Nope = 1",
        "((tag:a = 1)",
        "tag:a ! 1",
        "tag:city='Paris'\torsomething",
        "t\u{e9}g:\u{2003}x = '\u{1f600}'",
    ]
    .iter()
    .map(|text| text.as_bytes().to_vec())
    // Not UTF-8: refused before any parser sees it.
    .chain([b"tag:a = '\xff'".to_vec()])
    .enumerate()
    .map(|(n, bytes)| (format!("requirements-{n}"), bytes))
    .collect()
}

#[cfg(test)]
mod tests {
    /// Every seed runs clean, and every RPC has one.
    #[test]
    fn seeds_run_clean() {
        let seeds = super::requests();
        for rpc in crate::rpc::Rpc::ALL {
            assert!(
                seeds.iter().any(|(_, bytes)| bytes[0] == rpc.selector()),
                "no seed for {rpc:?}"
            );
        }
        for (_, bytes) in &seeds {
            crate::requests::run(bytes);
        }
        for (_, bytes) in super::requirements() {
            crate::requirements::run(&bytes);
        }
    }
}
