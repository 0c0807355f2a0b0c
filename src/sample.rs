//! Deterministic sample servers: the descriptions the demo fleet's agents
//! register, which tests and benchmarks reuse as realistic fixtures. Every
//! attribute is derived from the server's index, so the same index gives
//! the same description on every run. Kept apart from `demo` so that code
//! needing a sample description (the store's tests) does not depend on the
//! simulated agents.

use crate::fleet::{
    AwsInfo, CpuInfo, Endpoint, Gpu, HostInfo, LoadAverage, MemoryUsage, OsFamily, OsInfo,
    Protocol, ServerDescription, Tag,
};

/// A deterministic pseudo-random number for `index` and `salt` (SplitMix64).
pub(crate) fn mix(index: usize, salt: u64) -> u64 {
    let mut z = (index as u64).wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<'a>(index: usize, salt: u64, options: &[&'a str]) -> &'a str {
    options[(mix(index, salt) % options.len() as u64) as usize]
}

pub(crate) fn family(index: usize) -> OsFamily {
    if index == 0 {
        return OsFamily::Linux;
    }
    match mix(index, 1) % 10 {
        0..=6 => OsFamily::Linux,
        7..=8 => OsFamily::Windows,
        _ => OsFamily::Macos,
    }
}

/// The description the `index`-th simulated agent registers.
pub fn description(index: usize) -> ServerDescription {
    let family = family(index);
    let cpus = [2u32, 4, 8, 16, 32, 64][(mix(index, 2) % 6) as usize];
    let gib = 1i64 << 30;
    // Offset by one so that no server gets the network address 10.0.0.0.
    let host = index + 1;
    let ip = format!(
        "10.{}.{}.{}",
        (host >> 16) & 0xff,
        (host >> 8) & 0xff,
        host & 0xff
    );
    let (os_name, os_version, kernel, build) = match family {
        OsFamily::Linux => {
            let (name, version) = [
                ("Amazon Linux", "2023"),
                ("Ubuntu", "22.04"),
                ("Rocky Linux", "9.4"),
                ("Red Hat Enterprise Linux", "9.4"),
            ][(mix(index, 3) % 4) as usize];
            (name, version, "6.1.0", "")
        }
        OsFamily::Windows => ("Windows Server", "2022", "", "20348"),
        OsFamily::Macos => ("macOS", "14.5", "", "23F79"),
    };
    let gpu = !mix(index, 5).is_multiple_of(3);
    ServerDescription {
        ip: ip.clone().into(),
        hostname: format!("dcv-host-{index}.fleet.internal").into(),
        default_dns_name: format!("ip-{}.ec2.internal", ip.replace('.', "-")).into(),
        endpoints: vec![
            Endpoint {
                ip_address: ip.clone().into(),
                port: 8443,
                protocol: Protocol::Http,
                web_url_path: "/".into(),
            },
            Endpoint {
                ip_address: ip.into(),
                port: 8443,
                protocol: Protocol::Quic,
                web_url_path: String::new().into(),
            },
        ],
        version: "2024.0.19030".into(),
        agent_version: "2024.0.817".into(),
        host: HostInfo {
            os: OsInfo {
                family,
                name: os_name.into(),
                version: os_version.into(),
                kernel_version: kernel.into(),
                build_number: build.into(),
            },
            memory: MemoryUsage {
                total_bytes: i64::from(cpus) * 4 * gib,
                used_bytes: i64::from(cpus) * gib,
            },
            swap: MemoryUsage {
                total_bytes: 2 * gib,
                used_bytes: 0,
            },
            aws: Some(AwsInfo {
                region: pick(index, 6, &["us-east-1", "eu-west-1", "ap-northeast-1"]).into(),
                ec2_instance_type: if gpu { "g4dn.xlarge" } else { "m6i.xlarge" }.into(),
                ec2_instance_id: format!("i-{:017x}", mix(index, 7) >> 4).into(),
                ec2_image_id: "ami-0abcdef1234567890".into(),
            }),
            cpu_info: CpuInfo {
                vendor: "GenuineIntel".into(),
                model_name: "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz".into(),
                architecture: "x86_64".into(),
                number_of_cpus: cpus,
                physical_cores_per_cpu: (cpus / 2).max(1),
            },
            cpu_load_average: LoadAverage::default(),
            gpus: if gpu {
                vec![Gpu {
                    vendor: "NVIDIA Corporation".into(),
                    model_name: "Tesla T4".into(),
                }]
            } else {
                Vec::new()
            },
        },
        tags: vec![
            Tag {
                key: "pool".into(),
                value: pick(index, 8, &["engineering", "design", "training"]).into(),
            },
            Tag {
                key: "city".into(),
                value: pick(index, 9, &["London", "Seattle", "Tokyo"]).into(),
            },
            Tag {
                key: "gpu".into(),
                value: gpu.to_string().into(),
            },
        ],
        max_virtual_sessions: if family == OsFamily::Linux { 10 } else { 0 },
        max_concurrent_sessions_per_user: 1,
    }
}

/// [`description`] with seven more tags, ten in all: the servers of the
/// benchmarks, which measure memory and speed with realistically tagged
/// servers.
pub fn tagged_description(index: usize) -> ServerDescription {
    let mut d = description(index);
    let pick = |salt: usize, options: &[&str]| {
        options[(index
            .wrapping_mul(2_654_435_761)
            .wrapping_add(salt * 40_503)
            >> 7)
            % options.len()]
        .to_string()
    };
    let extra = [
        ("environment", pick(1, &["production", "staging", "test"])),
        (
            "cost-center",
            pick(2, &["cc-1042", "cc-2210", "cc-3307", "cc-4419"]),
        ),
        (
            "owner-team",
            pick(3, &["vfx", "cad", "sim", "games", "research"]),
        ),
        ("rack", format!("r{:03}", index / 40)),
        ("asset-id", format!("AS-{index:08}")),
        (
            "image",
            pick(4, &["golden-2024.10", "golden-2024.11", "golden-2025.01"]),
        ),
        (
            "department",
            pick(5, &["engineering", "design", "training", "support"]),
        ),
    ];
    for (key, value) in extra {
        d.tags.push(Tag {
            key: key.into(),
            value: value.into(),
        });
    }
    d
}
