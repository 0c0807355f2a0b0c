//! Placement `Requirements` against servers of the simulated fleet: DCV's
//! documented examples, each evaluation rule of the language, and property
//! tests that the parser never panics and that the canonical form round
//! trips and evaluates like a naive reference model.

use std::{sync::Arc, time::SystemTime};

use dcv_broker::{
    demo,
    fleet::{
        AwsInfo, LoadAverage, OsFamily, ServerDescription, ServerRecord, Tag,
        requirements::{
            Comparison, Expr, MAX_EXPRESSION_CHARS, Number, Op, Operand, Property, Requirements,
            Value,
        },
    },
};
use proptest::{
    prelude::*,
    sample::{Index, select},
};
use tokio::time::Instant;

fn record(id: &str, description: ServerDescription) -> ServerRecord {
    ServerRecord {
        id: Arc::from(id),
        description,
        dcv_server_healthy: true,
        logged_in_users: Vec::new(),
        sessions: Vec::new(),
        placing: Vec::new(),
        holds: Vec::new(),
        state_version: 0,
        registered_at: SystemTime::now(),
        last_seen: Instant::now(),
        last_seen_wall: SystemTime::now(),
        agent_departed: false,
        silence_noted: false,
    }
}

/// The `index`-th simulated server, as the fleet would hold it.
fn demo_server(index: usize) -> ServerRecord {
    record(&demo::server_id(index), demo::description(index))
}

/// The first simulated server of `family`.
fn demo_server_of(family: OsFamily) -> ServerRecord {
    (0..1000)
        .map(demo_server)
        .find(|s| s.description.host.os.family == family)
        .expect("the demo fleet mixes families")
}

/// A simulated server with custom tags replaced by `tags`.
fn tagged(mut server: ServerRecord, tags: &[(&str, &str)]) -> ServerRecord {
    server.description.tags = tags
        .iter()
        .map(|(k, v)| Tag {
            key: (*k).into(),
            value: (*v).into(),
        })
        .collect();
    server
}

fn on_instance(mut server: ServerRecord, instance_type: &str, cpus: u32) -> ServerRecord {
    let host = &mut server.description.host;
    host.aws = Some(AwsInfo {
        ec2_instance_type: instance_type.into(),
        ..host.aws.clone().unwrap_or_default()
    });
    host.cpu_info.number_of_cpus = cpus;
    server
}

fn off_ec2(mut server: ServerRecord) -> ServerRecord {
    server.description.host.aws = None;
    server
}

#[track_caller]
fn parse(text: &str) -> Requirements {
    Requirements::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[track_caller]
fn holds(text: &str, server: &ServerRecord) -> bool {
    parse(text).matches(server)
}

#[test]
fn dcv_example_tag_and_family() {
    let text = "tag:color = 'pink' and (server:Host.Os.Family = 'windows' or tag:color := 'red')";
    let windows = demo_server_of(OsFamily::Windows);
    let linux = demo_server_of(OsFamily::Linux);
    assert!(holds(text, &tagged(windows.clone(), &[("color", "pink")])));
    assert!(!holds(text, &tagged(linux.clone(), &[("color", "pink")])));
    assert!(!holds(text, &tagged(windows.clone(), &[("color", "red")])));
    assert!(!holds(
        text,
        &tagged(linux.clone(), &[("color", "dark red")])
    ));
    assert!(!holds(text, &windows), "no color tag");
    // The last value of a repeated key wins.
    assert!(holds(
        text,
        &tagged(windows.clone(), &[("color", "red"), ("color", "pink")])
    ));
    assert!(!holds(
        text,
        &tagged(windows, &[("color", "pink"), ("color", "red")])
    ));
}

#[test]
fn dcv_example_instance_type_and_cpus() {
    let text = "server:Host.Aws.Ec2InstanceType := 't2' and server:Host.CpuInfo.NumberOfCpus >= 2";
    let wire = "server:Host.Aws.EC2InstanceType := 't2' and server:Host.CpuInfo.NumberOfCpus >= 2";
    assert_eq!(parse(text), parse(wire));
    let base = demo_server(0);
    assert!(holds(text, &on_instance(base.clone(), "t2.medium", 2)));
    assert!(holds(text, &on_instance(base.clone(), "t2.2xlarge", 8)));
    assert!(!holds(text, &on_instance(base.clone(), "t2.micro", 1)));
    assert!(!holds(text, &on_instance(base.clone(), "m6i.xlarge", 4)));
    assert!(!holds(text, &on_instance(base.clone(), "T2.medium", 4)));
    assert!(!holds(text, &off_ec2(base)));
}

#[test]
fn exponents_and_numeric_properties() {
    let mut server = demo_server(0);
    server.description.host.memory.total_bytes = 8 << 30;
    server.description.host.cpu_load_average = LoadAverage {
        one_minute: 0.1,
        five_minutes: 0.0025,
        fifteen_minutes: 2.0,
    };
    assert!(holds("server:Host.Memory.TotalBytes >= 1024E6", &server));
    assert!(holds(
        "server:Host.Memory.TotalBytes = 8.589934592e9",
        &server
    ));
    assert!(holds("server:Host.Memory.TotalBytes = 8589934592", &server));
    assert!(!holds("server:Host.Memory.TotalBytes < 1024E6", &server));
    server.description.host.memory.total_bytes = 512 << 20;
    assert!(!holds("server:Host.Memory.TotalBytes >= 1024E6", &server));
    assert!(holds("server:Host.Memory.TotalBytes >= 1024e-6", &server));
    assert!(holds("server:Host.Memory.TotalBytes > -1", &server));
    // Load averages compare at the precision the agent reports.
    assert!(holds("server:Host.CpuLoadAverage.OneMinute = 0.1", &server));
    assert!(holds(
        "server:Host.CpuLoadAverage.OneMinute <= 0.1",
        &server
    ));
    assert!(holds(
        "server:Host.CpuLoadAverage.FiveMinutes = 2.5e-3",
        &server
    ));
    assert!(holds(
        "server:Host.CpuLoadAverage.FifteenMinutes = 2",
        &server
    ));
    // A numeric property against a string uses its canonical text.
    assert!(holds(
        "server:Host.CpuLoadAverage.FifteenMinutes = '2'",
        &server
    ));
    assert!(holds(
        "server:Host.CpuLoadAverage.OneMinute = '0.1'",
        &server
    ));
    server.description.host.cpu_info.number_of_cpus = 16;
    assert!(holds("server:Host.CpuInfo.NumberOfCpus = '16'", &server));
    assert!(holds("server:Host.CpuInfo.NumberOfCpus := '6'", &server));
    assert!(holds("server:Host.CpuInfo.NumberOfCpus := 6", &server));
    assert!(
        holds("server:Host.CpuInfo.NumberOfCpus < '2'", &server),
        "bytewise: '16' < '2'"
    );
    assert!(!holds("server:Host.CpuInfo.NumberOfCpus < 2", &server));
    // `:=` with a number looks for the literal as written.
    assert!(!holds("server:Host.CpuInfo.NumberOfCpus := 1.6e1", &server));
}

#[test]
fn escaped_quotes() {
    let server = tagged(demo_server(0), &[("owner", "o'neil"), ("it's", "mine")]);
    assert!(holds("tag:owner = 'o''neil'", &server));
    assert!(holds("tag:owner := ''''", &server));
    assert!(!holds("tag:owner = 'oneil'", &server));
    assert!(holds("tag:'it''s' = 'mine'", &server));
    let spaced = tagged(demo_server(0), &[("cost center", "42")]);
    assert!(holds("tag:'cost center' = 42", &spaced));
}

#[test]
fn not_and_precedence() {
    let server = tagged(demo_server(0), &[("a", "1"), ("b", "0"), ("c", "0")]);
    // `and` binds tighter than `or`: a or (b and c).
    assert!(holds("tag:a = '1' or tag:b = '1' and tag:c = '1'", &server));
    assert!(!holds(
        "(tag:a = '1' or tag:b = '1') and tag:c = '1'",
        &server
    ));
    // `not` binds tighter than `and`: (not a) and b.
    assert!(!holds("not tag:a = '1' and tag:b = '0'", &server));
    assert!(holds("not tag:b = '1' and tag:c = '0'", &server));
    assert!(!holds("not (tag:a = '1' and tag:b = '0')", &server));
    assert!(holds("not not tag:a = '1'", &server));
    assert!(holds(
        "NOT tag:a = '0' AND tag:b = '0' OR tag:c = '9'",
        &server
    ));
}

#[test]
fn built_in_tags() {
    let linux = demo_server_of(OsFamily::Linux);
    let windows = demo_server_of(OsFamily::Windows);
    assert!(holds("tag:dcv:os-family = 'linux'", &linux));
    assert!(!holds("tag:dcv:os-family = 'linux'", &windows));
    assert!(holds("tag:dcv:os-family = 'windows'", &windows));
    // A string tag compares numerically with a number.
    assert!(holds("tag:dcv:max-virtual-sessions >= 1E1", &linux));
    assert!(holds("tag:dcv:max-virtual-sessions = 0", &windows));
    assert!(holds(
        "tag:dcv:max-concurrent-sessions-per-user = 1",
        &linux
    ));
    // ... and bytewise with a string.
    assert!(holds("tag:dcv:max-virtual-sessions < '9'", &linux));
}

#[test]
fn missing_operands_are_false_for_every_operator() {
    let untagged = tagged(demo_server(0), &[]);
    let off_ec2 = off_ec2(demo_server(0));
    for op in Op::ALL {
        for value in ["'x'", "''", "1"] {
            for (text, server) in [
                (format!("tag:color {op} {value}"), &untagged),
                (format!("server:Host.Aws.Region {op} {value}"), &off_ec2),
            ] {
                assert!(!holds(&text, server), "{text}");
                assert!(holds(&format!("not {text}"), server), "not {text}");
            }
        }
    }
    assert!(holds("not tag:gpu = 'true'", &untagged));
}

#[test]
fn strings_compare_exactly_and_bytewise() {
    let server = tagged(demo_server(0), &[("city", "London"), ("size", "10")]);
    assert!(holds("tag:city = 'London'", &server));
    assert!(!holds("tag:city = 'london'", &server));
    assert!(holds("tag:city != 'london'", &server));
    assert!(holds("tag:city > 'Kyiv' and tag:city < 'Lyon'", &server));
    assert!(holds(
        "tag:city >= 'London' and tag:city <= 'London'",
        &server
    ));
    assert!(holds("tag:city := 'ond' and tag:city := ''", &server));
    assert!(holds("tag:size < '9'", &server));
    assert!(!holds("tag:size < 9", &server));
    // A string that is not a number is false against a number.
    for op in Op::ALL.into_iter().filter(|op| *op != Op::Contains) {
        assert!(!holds(&format!("tag:city {op} 1"), &server), "{op}");
    }
    let padded = tagged(demo_server(0), &[("n", " 5")]);
    assert!(!holds("tag:n = 5", &padded));
    assert!(holds("tag:n := 5", &padded));
}

#[test]
fn every_property_resolves() {
    let server = demo_server(3);
    let d = &server.description;
    let aws = d.host.aws.clone().expect("demo servers are on EC2");
    let expected: Vec<(Property, String)> = vec![
        (Property::Id, server.id.to_string()),
        (Property::Hostname, d.hostname.to_string()),
        (Property::Version, d.version.to_string()),
        (
            Property::SessionManagerAgentVersion,
            d.agent_version.to_string(),
        ),
        (
            Property::HostOsBuildNumber,
            d.host.os.build_number.to_string(),
        ),
        (Property::HostOsFamily, d.host.os.family.as_str().into()),
        (
            Property::HostOsKernelVersion,
            d.host.os.kernel_version.to_string(),
        ),
        (Property::HostOsName, d.host.os.name.to_string()),
        (Property::HostOsVersion, d.host.os.version.to_string()),
        (
            Property::HostMemoryTotalBytes,
            d.host.memory.total_bytes.to_string(),
        ),
        (
            Property::HostMemoryUsedBytes,
            d.host.memory.used_bytes.to_string(),
        ),
        (
            Property::HostSwapTotalBytes,
            d.host.swap.total_bytes.to_string(),
        ),
        (
            Property::HostSwapUsedBytes,
            d.host.swap.used_bytes.to_string(),
        ),
        (Property::HostCpuLoadAverageOneMinute, "0".into()),
        (Property::HostCpuLoadAverageFiveMinutes, "0".into()),
        (Property::HostCpuLoadAverageFifteenMinutes, "0".into()),
        (
            Property::HostAwsEc2InstanceId,
            aws.ec2_instance_id.to_string(),
        ),
        (
            Property::HostAwsEc2InstanceType,
            aws.ec2_instance_type.to_string(),
        ),
        (Property::HostAwsRegion, aws.region.to_string()),
        (Property::HostAwsEc2ImageId, aws.ec2_image_id.to_string()),
        (
            Property::HostCpuInfoArchitecture,
            d.host.cpu_info.architecture.to_string(),
        ),
        (
            Property::HostCpuInfoModelName,
            d.host.cpu_info.model_name.to_string(),
        ),
        (
            Property::HostCpuInfoNumberOfCpus,
            d.host.cpu_info.number_of_cpus.to_string(),
        ),
        (
            Property::HostCpuInfoPhysicalCoresPerCpu,
            d.host.cpu_info.physical_cores_per_cpu.to_string(),
        ),
        (
            Property::HostCpuInfoVendor,
            d.host.cpu_info.vendor.to_string(),
        ),
    ];
    assert_eq!(expected.len(), Property::ALL.len());
    for (property, value) in expected {
        let quoted = value.replace('\'', "''");
        let text = format!("server:{property} = '{quoted}'");
        assert!(holds(&text, &server), "{text}");
        assert!(!holds(&format!("server:{property} = '{quoted}x'"), &server));
        if property.is_numeric() {
            let text = format!("server:{property} = {value}");
            assert!(holds(&text, &server), "{text}");
        }
    }
    // A Windows host's kernel version is empty, which is a value.
    let windows = demo_server_of(OsFamily::Windows);
    assert!(holds("server:Host.Os.KernelVersion = ''", &windows));
    assert!(holds("server:Id = 'serverId1'", &demo_server(0)));
}

#[test]
fn display_round_trips_the_documented_examples() {
    for text in [
        "tag:color = 'pink' and (server:Host.Os.Family = 'windows' or tag:color := 'red')",
        "server:Host.Aws.Ec2InstanceType := 't2' and server:Host.CpuInfo.NumberOfCpus >= 2",
        "server:Host.Memory.TotalBytes >= 1024E6",
        "tag:owner = 'o''neil'",
        "tag:dcv:os-family = 'linux'",
    ] {
        let parsed = parse(text);
        assert_eq!(parsed.to_string(), text);
    }
}

// ---------------------------------------------------------------------------
// Property tests.

/// A few servers that between them give every rule something to bite on:
/// both families, on and off EC2, numeric tags, awkward keys, a non-zero
/// load.
fn servers() -> Vec<ServerRecord> {
    let mut odd = tagged(
        demo_server_of(OsFamily::Windows),
        &[
            ("color", "pink"),
            ("my key", "o'neil"),
            ("a:=b", "10"),
            ("", "empty"),
            ("pool", "1e3"),
        ],
    );
    odd.description.host.cpu_load_average = LoadAverage {
        one_minute: 0.25,
        five_minutes: 1.5,
        fifteen_minutes: 3.0,
    };
    vec![
        demo_server(0),
        demo_server(1),
        demo_server(2),
        off_ec2(demo_server_of(OsFamily::Macos)),
        odd,
    ]
}

/// Pieces of the language, and near misses, for random mixes.
const TOKENS: &[&str] = &[
    "tag:",
    "tag:color",
    "tag:dcv:os-family",
    "tag:'my key'",
    "tag:android",
    "server:",
    "server:Id",
    "server:Host.Os.Family",
    "server:Host.CpuInfo.NumberOfCpus",
    "server:Nope",
    "server:Host.Aws.EC2InstanceType",
    "Tag:x",
    "(",
    ")",
    "'",
    "''",
    "'pink'",
    "'o''neil'",
    "and",
    "AND",
    "or",
    "Or",
    "not",
    "NOT",
    "=",
    "!=",
    "!",
    "<",
    "<=",
    ">",
    ">=",
    ":=",
    ":",
    "1",
    "-1",
    "1024E6",
    "2.5e-3",
    "1e",
    ".5",
    "-",
    "+",
    "é",
    "\u{85}",
    "\t",
    "\n",
    " ",
    "  ",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => select(TOKENS).prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
        ],
        0..60,
    )
    .prop_map(|pieces| pieces.join(""))
}

fn spaced_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(select(TOKENS), 0..40).prop_map(|pieces| pieces.join(" "))
}

/// A long run of one token (deep nesting, long `not` chains, over-long
/// input) with something after it.
fn long_runs() -> impl Strategy<Value = String> {
    (select(TOKENS), 0..6000usize, token_soup())
        .prop_map(|(token, n, tail)| format!("{}{tail}", token.repeat(n)))
}

/// A valid expression with a few random edits: near misses that reach
/// every error path, and some that still parse.
fn mutated() -> impl Strategy<Value = String> {
    let edit = (0..3u8, any::<Index>(), select(TOKENS));
    (expr(), prop::collection::vec(edit, 1..4)).prop_map(|(expr, edits)| {
        let mut chars: Vec<char> = expr.to_string().chars().collect();
        for (kind, at, token) in edits {
            let i = at.index(chars.len() + 1);
            match kind {
                0 if i < chars.len() => {
                    chars.remove(i);
                }
                1 if i < chars.len() => {
                    chars.drain(i..(i + token.chars().count()).min(chars.len()));
                    chars.splice(i..i, token.chars());
                }
                _ => {
                    chars.splice(i..i, token.chars());
                }
            }
        }
        chars.into_iter().collect()
    })
}

/// Valid expressions written as tightly as the language allows, around
/// the length limit: their canonical form is longer than they are, so
/// some fit as written but not once spaced out.
fn near_the_limit() -> impl Strategy<Value = String> {
    // Every unit ends in a quote or `)`, so a keyword may follow directly.
    let unit = select(
        &[
            "tag:a:='x'",
            "(tag:b<'y')",
            "not(tag:c>=2)",
            "server:Id!='z'",
            "tag:'k k'<='1e3'",
            "(tag:a=1)",
        ][..],
    );
    let joiner = select(&[" or ", " and ", "or", "AND"][..]);
    (prop::collection::vec((unit, joiner), 1..8), 3000..4500usize).prop_map(|(parts, target)| {
        let mut text = String::from("tag:z='z'");
        for (unit, joiner) in parts.iter().cycle() {
            if text.len() >= target {
                break;
            }
            if joiner.starts_with(' ') {
                text = format!("{text}{joiner}{unit}");
            } else {
                text = format!("{text}{joiner}({unit})");
            }
        }
        text
    })
}

/// Checks what must hold of any input: no panic; an error inside the
/// input; a success that round trips and evaluates.
fn check_any_input(text: &str, servers: &[ServerRecord]) -> Result<(), TestCaseError> {
    match Requirements::parse(text) {
        Ok(parsed) => {
            let canonical = parsed.to_string();
            prop_assert_eq!(Requirements::parse(&canonical), Ok(parsed.clone()));
            for server in servers {
                let _ = parsed.matches(server);
            }
        }
        Err(e) => {
            prop_assert!(e.position <= text.chars().count(), "{e} for {text:?}");
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.message.chars().count() < 300, "{e}");
            prop_assert!(e.to_string().starts_with("at character "));
        }
    }
    Ok(())
}

fn tag_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(&[
            "pool", "city", "gpu", "color", "missing", "my key", "a:=b", "",
            "dcv:os-family", "dcv:max-virtual-sessions", "dcv:max-concurrent-sessions-per-user",
        ][..])
        .prop_map(String::from),
        1 => "[a-z:'= ()!<>é\t]{0,6}",
    ]
}

fn string_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(&[
            "London", "Seattle", "Tokyo", "engineering", "design", "training", "true", "false",
            "linux", "windows", "macos", "pink", "o'neil", "10", "0", "1", "16", "2", "0.25",
            "g4dn", "m6i.xlarge", "2024", "serverId1", "x86_64", "Intel", "",
        ][..])
        .prop_map(String::from),
        1 => "[a-zA-Z0-9' ().:=é\n]{0,8}",
    ]
}

fn number() -> impl Strategy<Value = Number> {
    let sign = select(&["", "-", "+"][..]);
    let fraction = prop::option::of("[0-9]{1,2}");
    let exponent = prop::option::of((
        select(&["e", "E"][..]),
        select(&["", "-", "+"][..]),
        "[0-9]{1,2}",
    ));
    (sign, "[0-9]{1,3}", fraction, exponent).prop_map(|(sign, digits, fraction, exponent)| {
        let mut text = format!("{sign}{digits}");
        if let Some(f) = fraction {
            text.push('.');
            text.push_str(&f);
        }
        if let Some((e, s, d)) = exponent {
            text.push_str(&format!("{e}{s}{d}"));
        }
        Number::parse(&text).expect("generated numbers are valid")
    })
}

fn comparison() -> impl Strategy<Value = Expr> {
    let operand = prop_oneof![
        tag_key().prop_map(Operand::Tag),
        select(&Property::ALL[..]).prop_map(Operand::Server),
    ];
    let value = prop_oneof![
        string_value().prop_map(Value::Str),
        number().prop_map(Value::Number),
    ];
    (operand, select(&Op::ALL[..]), value)
        .prop_map(|(operand, op, value)| Expr::Compare(Comparison { operand, op, value }))
}

fn expr() -> impl Strategy<Value = Expr> {
    comparison().prop_recursive(6, 48, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            (inner.clone(), inner.clone()).prop_map(|(l, r)| Expr::And(Box::new(l), Box::new(r))),
            (inner.clone(), inner).prop_map(|(l, r)| Expr::Or(Box::new(l), Box::new(r))),
        ]
    })
}

/// The operand's text on `server` and whether it is a number, written from
/// the language's documentation rather than from the implementation.
fn reference_operand(server: &ServerRecord, operand: &Operand) -> Option<(String, bool)> {
    let d = &server.description;
    let h = &d.host;
    let text = |s: &str| Some((s.to_string(), false));
    let number = |s: String| Some((s, true));
    match operand {
        Operand::Tag(key) => match key.as_str() {
            "dcv:os-family" => text(h.os.family.as_str()),
            "dcv:max-virtual-sessions" => text(&d.max_virtual_sessions.to_string()),
            "dcv:max-concurrent-sessions-per-user" => {
                text(&d.max_concurrent_sessions_per_user.to_string())
            }
            _ => d
                .tags
                .iter()
                .rfind(|t| *t.key == **key)
                .and_then(|t| text(&t.value)),
        },
        Operand::Server(p) => match p.name() {
            "Id" => text(&server.id),
            "Hostname" => text(&d.hostname),
            "Version" => text(&d.version),
            "SessionManagerAgentVersion" => text(&d.agent_version),
            "Host.Os.BuildNumber" => text(&h.os.build_number),
            "Host.Os.Family" => text(h.os.family.as_str()),
            "Host.Os.KernelVersion" => text(&h.os.kernel_version),
            "Host.Os.Name" => text(&h.os.name),
            "Host.Os.Version" => text(&h.os.version),
            "Host.Memory.TotalBytes" => number(h.memory.total_bytes.to_string()),
            "Host.Memory.UsedBytes" => number(h.memory.used_bytes.to_string()),
            "Host.Swap.TotalBytes" => number(h.swap.total_bytes.to_string()),
            "Host.Swap.UsedBytes" => number(h.swap.used_bytes.to_string()),
            "Host.CpuLoadAverage.OneMinute" => number(h.cpu_load_average.one_minute.to_string()),
            "Host.CpuLoadAverage.FiveMinutes" => {
                number(h.cpu_load_average.five_minutes.to_string())
            }
            "Host.CpuLoadAverage.FifteenMinutes" => {
                number(h.cpu_load_average.fifteen_minutes.to_string())
            }
            "Host.Aws.Ec2InstanceId" => text(&h.aws.as_ref()?.ec2_instance_id),
            "Host.Aws.Ec2InstanceType" => text(&h.aws.as_ref()?.ec2_instance_type),
            "Host.Aws.Region" => text(&h.aws.as_ref()?.region),
            "Host.Aws.Ec2ImageId" => text(&h.aws.as_ref()?.ec2_image_id),
            "Host.CpuInfo.Architecture" => text(&h.cpu_info.architecture),
            "Host.CpuInfo.ModelName" => text(&h.cpu_info.model_name),
            "Host.CpuInfo.NumberOfCpus" => number(h.cpu_info.number_of_cpus.to_string()),
            "Host.CpuInfo.PhysicalCoresPerCpu" => {
                number(h.cpu_info.physical_cores_per_cpu.to_string())
            }
            "Host.CpuInfo.Vendor" => text(&h.cpu_info.vendor),
            other => panic!("property {other} missing from the reference model"),
        },
    }
}

fn reference(expr: &Expr, server: &ServerRecord) -> bool {
    match expr {
        Expr::Not(e) => !reference(e, server),
        Expr::And(l, r) => reference(l, server) && reference(r, server),
        Expr::Or(l, r) => reference(l, server) || reference(r, server),
        Expr::Compare(c) => {
            let Some((text, numeric)) = reference_operand(server, &c.operand) else {
                return false;
            };
            let ordering = match &c.value {
                Value::Str(s) if c.op == Op::Contains => return text.contains(s.as_str()),
                Value::Number(n) if c.op == Op::Contains => return text.contains(n.as_str()),
                Value::Str(s) => text.as_bytes().cmp(s.as_bytes()),
                Value::Number(n) => {
                    let actual = if numeric {
                        text.parse::<f64>().ok()
                    } else {
                        Number::parse(&text).map(|n| n.value())
                    };
                    match actual.and_then(|a| a.partial_cmp(&n.value())) {
                        Some(ordering) => ordering,
                        None => return false,
                    }
                }
            };
            match c.op {
                Op::Eq => ordering.is_eq(),
                Op::Ne => ordering.is_ne(),
                Op::Lt => ordering.is_lt(),
                Op::Le => ordering.is_le(),
                Op::Gt => ordering.is_gt(),
                Op::Ge => ordering.is_ge(),
                Op::Contains => unreachable!("handled above"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in any::<String>()) {
        check_any_input(&text, &servers())?;
    }

    #[test]
    fn parse_never_panics_on_token_soup(text in prop_oneof![token_soup(), spaced_soup()]) {
        check_any_input(&text, &servers())?;
    }

    #[test]
    fn parse_never_panics_on_mutated_expressions(text in mutated()) {
        check_any_input(&text, &servers())?;
    }

    #[test]
    fn expressions_near_the_limit_round_trip_or_are_refused(text in near_the_limit()) {
        check_any_input(&text, &servers())?;
    }

    #[test]
    fn parse_never_panics_on_long_runs(text in long_runs()) {
        check_any_input(&text, &servers())?;
    }

    #[test]
    fn display_round_trips_and_evaluates_like_the_reference(expr in expr()) {
        let text = expr.to_string();
        prop_assume!(text.chars().count() <= MAX_EXPRESSION_CHARS);
        let parsed = Requirements::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{text:?} did not parse: {e}")))?;
        prop_assert_eq!(parsed.expr(), &expr);
        prop_assert_eq!(parsed.to_string(), text);
        for server in servers() {
            let got = parsed.matches(&server);
            prop_assert_eq!(got, expr.matches(&server));
            prop_assert_eq!(got, reference(&expr, &server), "on {}", server.id);
        }
    }
}
