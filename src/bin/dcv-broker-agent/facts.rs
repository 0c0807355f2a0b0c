//! Facts about the host (Linux): OS, CPUs, memory and swap, load, GPUs,
//! logged-in users, host name, primary IP, the DCV server's endpoint, and
//! EC2 facts only when asked. This is the one module that knows it runs
//! on Linux (`/proc/cpuinfo`, `who`, `nvidia-smi`); everything it reports
//! fits the platform-neutral `Host` message.
//!
//! Nothing here contacts the network, except the EC2 instance metadata
//! service when `aws_metadata = true`, with a short timeout.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    process::Stdio,
    time::Duration,
};

use sysinfo::System;
use tokio::process::Command;

use dcv_broker::pb;

use crate::config::Config;

/// `nvidia-smi` and `who` answer in milliseconds; one that takes longer is
/// stuck, and the facts go without it.
const HELPER_TIMEOUT: Duration = Duration::from_secs(5);
/// Their output is a line per GPU or session.
const MAX_HELPER_OUTPUT: usize = 256 * 1024;
/// The most logged-in users and GPUs reported: a report stays small.
const MAX_USERS: usize = 256;
const MAX_GPUS: usize = 64;
/// Each IMDS request; the service answers in microseconds on EC2, and off
/// EC2 the agent must not stall on it.
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
/// IMDSv2 token lifetime requested (we ask once per registration).
const IMDS_TOKEN_TTL_SECS: &str = "60";
const MAX_IMDS_REPLY: u64 = 4096;

/// What changes between heartbeats.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub cpu_load_average: pb::CpuLoadAverage,
    pub memory: pb::MemoryInfo,
    pub swap: pb::MemoryInfo,
}

/// Load averages, memory and swap now.
pub fn load() -> Load {
    let mut sys = System::new();
    sys.refresh_memory();
    let avg = System::load_average();
    let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Load {
        cpu_load_average: pb::CpuLoadAverage {
            one_minute: avg.one as f32,
            five_minutes: avg.five as f32,
            fifteen_minutes: avg.fifteen as f32,
        },
        memory: pb::MemoryInfo {
            total_bytes: bytes(sys.total_memory()),
            used_bytes: bytes(sys.used_memory()),
        },
        swap: pb::MemoryInfo {
            total_bytes: bytes(sys.total_swap()),
            used_bytes: bytes(sys.used_swap()),
        },
    }
}

/// The registration: who this host is, what it has, where DCV listens.
pub async fn registration(config: &Config, server_id: &str) -> pb::RegisterServerRequest {
    let ip = primary_ip(config).await;
    let hostname = System::host_name().unwrap_or_default();
    let load = load();
    let mut sys = System::new();
    sys.refresh_cpu_all();
    let cpus = sys.cpus();
    let logical = cpus.len().max(1);
    let physical = System::physical_core_count().unwrap_or(logical);
    let sockets = sockets().max(1);
    let cpu_info = pb::CpuInfo {
        vendor: cpus
            .first()
            .map(|c| c.vendor_id().to_owned())
            .unwrap_or_default(),
        model_name: cpus
            .first()
            .map(|c| c.brand().trim().to_owned())
            .unwrap_or_default(),
        architecture: System::cpu_arch(),
        number_of_cpus: i32::try_from(logical).unwrap_or(i32::MAX),
        physical_cores_per_cpu: i32::try_from((physical / sockets).max(1)).unwrap_or(i32::MAX),
    };
    let users = if config.enable_query_logged_in_users {
        logged_in_users().await
    } else {
        Vec::new()
    };
    let aws = if config.aws_metadata {
        let endpoint = config.aws_metadata_endpoint.clone();
        tokio::task::spawn_blocking(move || aws_facts(&endpoint))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    pb::RegisterServerRequest {
        server_id: server_id.to_owned(),
        ip: ip.to_string(),
        hostname: hostname.clone(),
        default_dns_name: hostname,
        endpoints: vec![pb::Endpoint {
            ip_address: ip.to_string(),
            port: i32::from(config.dcv_port),
            protocol: pb::Protocol::Http as i32,
            web_url_path: config.dcv_web_url_path.clone(),
        }],
        version: String::new(),
        session_manager_agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        host: Some(pb::Host {
            os: Some(pb::Os {
                family: "linux".into(),
                name: System::name().unwrap_or_default(),
                version: System::os_version().unwrap_or_default(),
                kernel_version: System::kernel_version().unwrap_or_default(),
                build_number: String::new(),
            }),
            memory: Some(load.memory),
            swap: Some(load.swap),
            aws,
            cpu_info: Some(cpu_info),
            cpu_load_average: Some(load.cpu_load_average),
            gpus: gpus().await,
            logged_in_users: users,
        }),
        tags: config
            .tags
            .iter()
            .map(|(k, v)| pb::KeyValuePair {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        max_virtual_sessions: config.max_virtual_sessions,
        max_concurrent_sessions_per_user: config.max_concurrent_sessions_per_user,
    }
}

/// The address this host would use to reach the broker: a UDP socket
/// "connected" to the broker (which sends nothing) tells the route's
/// source address. Falls back to 127.0.0.1.
async fn primary_ip(config: &Config) -> IpAddr {
    let target = (config.broker_host.clone(), config.broker_port);
    tokio::task::spawn_blocking(move || {
        let addr: SocketAddr = target.to_socket_addrs().ok()?.next()?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().ok()?
        } else {
            "0.0.0.0:0".parse().ok()?
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(addr).ok()?;
        Some(socket.local_addr().ok()?.ip())
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// CPU sockets: distinct `physical id`s of /proc/cpuinfo.
fn sockets() -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
        return 1;
    };
    text.lines()
        .filter(|l| l.starts_with("physical id"))
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect::<BTreeSet<_>>()
        .len()
}

/// Runs a helper tool with a timeout; its stdout, or None.
async fn helper(program: &str, args: &[&str]) -> Option<String> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.truncate(
        (0..=MAX_HELPER_OUTPUT.min(text.len()))
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0),
    );
    Some(text)
}

/// NVIDIA GPUs, when `nvidia-smi` is installed; none otherwise.
pub async fn gpus() -> Vec<pb::Gpu> {
    let Some(text) = helper("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader"]).await
    else {
        return Vec::new();
    };
    parse_gpus(&text)
}

fn parse_gpus(text: &str) -> Vec<pb::Gpu> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(MAX_GPUS)
        .map(|name| pb::Gpu {
            vendor: "NVIDIA".into(),
            model_name: name.to_owned(),
        })
        .collect()
}

/// Users with a login session now (`who`), each once.
pub async fn logged_in_users() -> Vec<pb::LoggedInUser> {
    let Some(text) = helper("who", &[]).await else {
        return Vec::new();
    };
    parse_who(&text)
}

fn parse_who(text: &str) -> Vec<pb::LoggedInUser> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .take(MAX_USERS)
        .map(|u| pb::LoggedInUser {
            username: u.to_owned(),
        })
        .collect()
}

/// EC2 facts from the instance metadata service (IMDSv2: a token PUT, then
/// GETs), or None when it does not answer in time.
pub fn aws_facts(endpoint: &str) -> Option<pb::Aws> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(true)
        .timeout_global(Some(IMDS_TIMEOUT))
        .build()
        .into();
    let token = agent
        .put(format!("{endpoint}/latest/api/token"))
        .header("x-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL_SECS)
        .send_empty()
        .ok()?
        .body_mut()
        .with_config()
        .limit(MAX_IMDS_REPLY)
        .read_to_string()
        .ok()?;
    let get = |path: &str| -> Option<String> {
        let text = agent
            .get(format!("{endpoint}/latest/meta-data/{path}"))
            .header("x-aws-ec2-metadata-token", token.trim())
            .call()
            .ok()?
            .body_mut()
            .with_config()
            .limit(MAX_IMDS_REPLY)
            .read_to_string()
            .ok()?;
        Some(text.trim().to_owned())
    };
    Some(pb::Aws {
        region: get("placement/region").unwrap_or_default(),
        ec2_instance_type: get("instance-type").unwrap_or_default(),
        ec2_instance_id: get("instance-id")?,
        ec2_image_id: get("ami-id").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    #[test]
    fn who_and_nvidia_smi_outputs_parse() {
        let who = "alice    pts/0        2026-01-01 10:00 (10.0.0.1)\nbob      :1   2026-01-01\nalice    pts/1  x\n";
        let users: Vec<_> = parse_who(who).into_iter().map(|u| u.username).collect();
        assert_eq!(users, ["alice", "bob"]);
        let gpus = parse_gpus("Tesla T4\nNVIDIA A10G\n\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].model_name, "NVIDIA A10G");
    }

    #[test]
    fn the_load_is_read_from_the_host() {
        let l = load();
        assert!(l.memory.total_bytes > 0);
        assert!(l.memory.used_bytes <= l.memory.total_bytes);
    }

    /// A fake IMDS on 127.0.0.1: answers the token PUT, then the GETs only
    /// with the token.
    #[test]
    fn aws_facts_use_an_imdsv2_token() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming().take(5) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut token_ok = false;
                let mut length = 0;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("x-aws-ec2-metadata-token: tok") {
                        token_ok = true;
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let path = request_line.split_whitespace().nth(1).unwrap().to_owned();
                let reply = match (request_line.starts_with("PUT"), path.as_str(), token_ok) {
                    (true, "/latest/api/token", _) => "tok",
                    (false, "/latest/meta-data/placement/region", true) => "eu-west-1",
                    (false, "/latest/meta-data/instance-type", true) => "g4dn.xlarge",
                    (false, "/latest/meta-data/instance-id", true) => "i-0123",
                    (false, "/latest/meta-data/ami-id", true) => "ami-9",
                    _ => "",
                };
                let status = if reply.is_empty() {
                    "401 Unauthorized"
                } else {
                    "200 OK"
                };
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                )
                .unwrap();
                seen.push(path);
            }
            seen
        });
        let aws = aws_facts(&endpoint).unwrap();
        assert_eq!(aws.region, "eu-west-1");
        assert_eq!(aws.ec2_instance_type, "g4dn.xlarge");
        assert_eq!(aws.ec2_instance_id, "i-0123");
        assert_eq!(aws.ec2_image_id, "ami-9");
        assert_eq!(server.join().unwrap()[0], "/latest/api/token");
    }

    #[test]
    fn no_imds_means_no_aws_facts_quickly() {
        // A port nobody listens on: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        assert!(aws_facts(&format!("http://127.0.0.1:{port}")).is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
