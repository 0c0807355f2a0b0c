//! Tests of the binary's flags: defaults, parsing and what they turn into.

use super::*;

#[test]
fn non_loopback_needs_tls_and_auth_or_the_insecure_flag() {
    let public: SocketAddr = "0.0.0.0:8443".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let local6: SocketAddr = "[::1]:8443".parse().unwrap();
    for (tls, auth) in [(false, false), (true, false), (false, true)] {
        assert!(
            check_listen(public, tls, auth, false).is_err(),
            "{tls} {auth}"
        );
        assert!(check_listen(public, tls, auth, true).is_ok());
        assert!(check_listen(local, tls, auth, false).is_ok());
        assert!(check_listen(local6, tls, auth, false).is_ok());
    }
    assert!(check_listen(public, true, true, false).is_ok());
    let why = check_listen(public, true, false, false).unwrap_err();
    assert!(why.contains("without authentication (--auth off)"), "{why}");
}

#[test]
fn auth_follows_tls_unless_told_and_agent_ca_needs_both() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["dcv-broker"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    };
    let tls = ["--tls-cert", "s.pem", "--tls-key", "k.pem"];
    assert!(!parse(&[]).auth_enabled());
    assert!(parse(&tls).auth_enabled());
    assert!(parse(&["--auth", "on"]).auth_enabled());
    assert!(!parse(&[&tls[..], &["--auth", "off"]].concat()).auth_enabled());
    assert!(parse(&["--agent-ca", "ca.pem"]).check().is_err());
    assert!(
        parse(&[&tls[..], &["--agent-ca", "ca.pem"]].concat())
            .check()
            .is_ok()
    );
    assert!(
        parse(&[&tls[..], &["--agent-ca", "ca.pem", "--auth", "off"]].concat())
            .check()
            .is_err()
    );
    assert!(parse(&["--token-ttl", "0s"]).check().is_err());
}

#[test]
fn defaults_parse_and_are_consistent() {
    let args = Args::try_parse_from(["dcv-broker"]).unwrap();
    assert!(args.check().is_ok());
    assert_eq!(args.listen.to_string(), "127.0.0.1:8443");
    let bad = Args::try_parse_from(["dcv-broker", "--unreachable-after", "2h"]).unwrap();
    assert!(bad.check().is_err());
}

#[test]
fn allowed_hosts_repeat_or_split_on_commas() {
    let none = Args::try_parse_from(["dcv-broker"]).unwrap();
    assert!(none.broker_config().allowed_hosts.is_empty());
    let some = Args::try_parse_from([
        "dcv-broker",
        "--allowed-host",
        "broker.internal",
        "--allowed-host",
        "a.test,b.test",
    ])
    .unwrap();
    assert_eq!(
        some.broker_config().allowed_hosts,
        ["broker.internal", "a.test", "b.test"]
    );
}

#[test]
fn limit_flags_default_to_the_limits_and_zero_turns_off() {
    let args = Args::try_parse_from(["dcv-broker"]).unwrap();
    assert_eq!(args.broker_config().limits, Limits::default());

    let off = Args::try_parse_from([
        "dcv-broker",
        "--client-rate",
        "0",
        "--max-concurrent-requests",
        "0",
    ])
    .unwrap();
    assert!(off.check().is_ok());
    let limits = off.broker_config().limits;
    assert_eq!(limits.client_rate, None);
    assert_eq!(limits.max_concurrent_requests, None);

    let set = Args::try_parse_from([
        "dcv-broker",
        "--client-rate",
        "5",
        "--client-burst",
        "10",
        "--max-request-bytes",
        "1048576",
        "--max-header-list-bytes",
        "8192",
        "--max-concurrent-streams",
        "100",
    ])
    .unwrap();
    let limits = set.broker_config().limits;
    assert_eq!(limits.client_rate, ClientRate::new(5, 10));
    assert_eq!(limits.max_request_bytes, 1 << 20);
    assert_eq!(limits.max_header_list_bytes, 8192);
    assert_eq!(limits.max_concurrent_streams, 100);

    for bad in [
        &["--client-rate", "5", "--client-burst", "0"][..],
        &["--max-header-list-bytes", "100"],
        &["--max-concurrent-streams", "0"],
        &["--max-request-bytes", "0"],
    ] {
        let args = Args::try_parse_from(["dcv-broker"].iter().chain(bad)).unwrap();
        assert!(args.check().is_err(), "{bad:?}");
    }
}

#[test]
fn connection_and_shutdown_flags_default_to_the_library_and_zero_turns_off() {
    let args = Args::try_parse_from(["dcv-broker"]).unwrap();
    let config = args.broker_config();
    assert_eq!(
        config.connections,
        crate::server::connections::ConnectionLimits::default()
    );
    assert_eq!(
        config.shutdown_grace,
        BrokerConfig::default().shutdown_grace
    );
    let off = Args::try_parse_from([
        "dcv-broker",
        "--first-request-timeout",
        "0s",
        "--idle-connection-timeout",
        "0s",
        "--max-connections",
        "50",
    ])
    .unwrap();
    let connections = off.broker_config().connections;
    assert_eq!(connections.first_request_timeout, None);
    assert_eq!(connections.idle_timeout, None);
    assert_eq!(connections.max_connections, 50);
    let none = Args::try_parse_from(["dcv-broker", "--max-connections", "0"]).unwrap();
    assert!(none.check().is_err());
}

#[test]
fn tls_allows_non_loopback_and_needs_both_files() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["dcv-broker", "--listen", "0.0.0.0:8443"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap().check()
    };
    assert!(parse(&["--tls-cert", "s.pem", "--tls-key", "k.pem"]).is_ok());
    let half = parse(&["--tls-cert", "s.pem"]).unwrap_err();
    assert!(
        half.contains("--tls-cert and --tls-key go together"),
        "{half}"
    );
    assert!(parse(&["--tls-key", "k.pem"]).is_err());
}

#[test]
fn tls_init_is_a_subcommand_and_serving_stays_the_default() {
    let args = Args::try_parse_from([
        "dcv-broker",
        "tls",
        "init",
        "--names",
        "broker.example.com,127.0.0.1",
        "--out",
        "certs",
    ])
    .unwrap();
    let Some(Command::Tls {
        command: TlsCommand::Init(init),
    }) = args.command
    else {
        panic!("expected tls init, got {:?}", args.command);
    };
    assert_eq!(init.names, ["broker.example.com", "127.0.0.1"]);
    assert_eq!(init.days, 825);
    assert!(!init.force);
    let serve = Args::try_parse_from(["dcv-broker", "--demo-fleet", "3"]).unwrap();
    assert!(serve.command.is_none());
}

#[test]
fn screenshot_flags_default_to_dcvs_settings_and_are_bounded() {
    let defaults = Args::try_parse_from(["dcv-broker"])
        .unwrap()
        .broker_config();
    let fleet = crate::fleet::FleetConfig::default();
    assert_eq!(defaults.fleet.screenshot_timeout, fleet.screenshot_timeout);
    assert_eq!(
        (
            defaults.fleet.screenshot_max_width,
            defaults.fleet.screenshot_max_height,
            defaults.fleet.screenshot_format
        ),
        (160, 100, crate::fleet::ImageFormat::Png)
    );
    let set = Args::try_parse_from([
        "dcv-broker",
        "--screenshot-timeout",
        "2s",
        "--screenshot-max-width",
        "4096",
        "--screenshot-max-height",
        "1",
        "--screenshot-format",
        "jpeg",
    ])
    .unwrap()
    .broker_config()
    .fleet;
    assert_eq!(set.screenshot_timeout, Duration::from_secs(2));
    assert_eq!(
        (set.screenshot_max_width, set.screenshot_max_height),
        (4096, 1)
    );
    assert_eq!(set.screenshot_format, crate::fleet::ImageFormat::Jpeg);
    for bad in [
        ["--screenshot-max-width", "0"],
        ["--screenshot-max-height", "4097"],
        ["--screenshot-format", "gif"],
    ] {
        let mut argv = vec!["dcv-broker"];
        argv.extend_from_slice(&bad);
        assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
    }
}

#[test]
fn register_api_client_takes_dcv_spellings_of_the_name() {
    let name = |argv: &[&str]| {
        let mut full = vec!["dcv-broker"];
        full.extend_from_slice(argv);
        match Args::try_parse_from(dcv_spellings(full)).map(|a| a.command) {
            Ok(Some(Command::RegisterApiClient { client_name, .. })) => Ok(client_name),
            Ok(other) => panic!("{argv:?}: {other:?}"),
            Err(e) => Err(e.kind()),
        }
    };
    for argv in [
        &["register-api-client", "--client-name", "ac"][..],
        &["register-api-client", "-cn", "ac"],
        &["register-api-client", "--name", "ac"],
        &["register-api-client", "--client-name=ac"],
        &["register-api-client", "--data-dir", "d", "-cn", "ac"],
    ] {
        assert_eq!(name(argv), Ok("ac".to_owned()), "{argv:?}");
    }
    // A name that happens to be spelled like the option is kept.
    assert_eq!(
        name(&["register-api-client", "--client-name=-cn"]),
        Ok("-cn".to_owned())
    );
    assert_eq!(
        name(&["register-api-client"]),
        Err(clap::error::ErrorKind::MissingRequiredArgument)
    );
    // Only after the subcommand: elsewhere `-cn` means what clap says.
    assert_eq!(
        dcv_spellings(["dcv-broker", "-cn", "register-api-client"]),
        ["dcv-broker", "-cn", "register-api-client"].map(std::ffi::OsString::from)
    );
}

#[test]
fn cluster_flags_are_checked() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["dcv-broker", "--database-url", "postgres://db/broker"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    };
    let check = |extra: &[&str]| parse(extra).unwrap().check();
    assert!(check(&[]).is_ok());
    assert_eq!(parse(&[]).unwrap().leader_lease, Duration::from_secs(5));
    let why = check(&["--leader-lease", "100ms"]).unwrap_err();
    assert!(why.contains("at least 500ms"), "{why}");
    let why = check(&["--demo-fleet", "3"]).unwrap_err();
    assert!(why.contains("--demo-fleet"), "{why}");
    // Every address: the other replicas need to be told where this is.
    let everywhere = ["--listen", "0.0.0.0:8443", "--allow-insecure-non-loopback"];
    let why = check(&everywhere).unwrap_err();
    assert!(why.contains("--advertise-url"), "{why}");
    assert!(
        check(
            &[
                &everywhere[..],
                &["--advertise-url", "http://10.0.0.1:8443"]
            ]
            .concat()
        )
        .is_ok()
    );
    for (url, says) in [
        ("https://10.0.0.1:8443", "http://"),
        ("http://10.0.0.1", "host and a port"),
        ("http://10.0.0.1:8443/x", "no path"),
        ("not a url at all", "not a URL"),
    ] {
        let why = check(&["--advertise-url", url]).unwrap_err();
        assert!(why.contains(says), "{url}: {why}");
    }
    let tls = ["--tls-cert", "s.pem", "--tls-key", "k.pem"];
    assert!(check(&[&tls[..], &["--advertise-url", "https://b1.example:8443"]].concat()).is_ok());
    let why =
        check(&[&tls[..], &["--advertise-url", "http://b1.example:8443"]].concat()).unwrap_err();
    assert!(why.contains("https://"), "{why}");
    let why = check(&["--node-id", ""]).unwrap_err();
    assert!(why.contains("--node-id"), "{why}");
    // Cluster flags mean nothing without a shared database.
    assert!(Args::try_parse_from(["dcv-broker", "--node-id", "a"]).is_err());
}

#[test]
fn audit_flags_default_to_no_copy_and_ninety_days() {
    let args = Args::try_parse_from(["dcv-broker"]).unwrap();
    assert_eq!(args.audit_log, None);
    assert_eq!(args.audit_retention, crate::audit::DEFAULT_RETENTION);
    let args = Args::try_parse_from(["dcv-broker", "--audit-log", "-", "--audit-retention", "7d"])
        .unwrap();
    assert_eq!(
        crate::audit::Destination::parse(args.audit_log.as_deref().unwrap()),
        crate::audit::Destination::Stdout
    );
    assert_eq!(args.audit_retention, Duration::from_secs(7 * 24 * 3600));
    assert!(Args::try_parse_from(["dcv-broker", "--audit-retention", "soon"]).is_err());
}

#[test]
fn metrics_are_on_by_default_and_their_port_is_loopback_unless_allowed() {
    let parse =
        |extra: &[&str]| Args::try_parse_from(["dcv-broker"].iter().chain(extra).copied()).unwrap();
    let default = parse(&[]);
    assert!(default.metrics);
    assert_eq!(default.metrics_listen, None);
    assert!(!parse(&["--metrics", "false"]).metrics);
    assert!(
        parse(&["--metrics-listen", "127.0.0.1:9464"])
            .check()
            .is_ok()
    );
    let why = parse(&["--metrics-listen", "0.0.0.0:9464"])
        .check()
        .unwrap_err();
    assert!(why.contains("--metrics-listen 0.0.0.0:9464"), "{why}");
    assert!(
        parse(&[
            "--metrics-listen",
            "0.0.0.0:9464",
            "--allow-insecure-non-loopback"
        ])
        .check()
        .is_ok()
    );
    let why = parse(&["--metrics", "false", "--metrics-listen", "127.0.0.1:9464"])
        .check()
        .unwrap_err();
    assert!(
        why.contains("--metrics-listen needs the metrics on"),
        "{why}"
    );
}
