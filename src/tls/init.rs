//! `dcv-broker tls init`: a private CA and a server certificate it signs,
//! for a first install, as DCV's broker makes its own CA on first start.
//!
//! Writes `ca.pem` (give it to clients, agents and DCV servers), `ca-key.pem`
//! (keep it offline), `server.pem` and `server-key.pem` (the broker's
//! `--tls-cert` and `--tls-key`). Keys are ECDSA P-256, written mode 0600.
//! Existing files are never replaced without `--force`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca-key.pem";
/// The server certificate's file name.
pub const SERVER_CERT: &str = "server.pem";
/// The server key's file name.
pub const SERVER_KEY: &str = "server-key.pem";

/// The CA lives this long (or as long as the server certificate, if
/// longer): clients keep trusting it while server certificates come and go.
pub const CA_DAYS: u32 = 3650;

/// Certificates start this long before now, so that a client whose clock
/// is a little behind still accepts them.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// `dcv-broker tls init`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The names clients use to reach the broker: DNS names and IP
    /// addresses, comma-separated (e.g. broker.example.com,10.0.0.5). The
    /// certificate is valid for exactly these; the first is its common name.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub names: Vec<String>,

    /// Directory to write the four files into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// How many days the server certificate is valid. The CA is valid for
    /// ten years, or as long as the certificate if that is longer.
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,

    /// Replace files that already exist in DIR.
    #[arg(long)]
    pub force: bool,
}

/// Why `tls init` could not make or write the files.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A name is neither an IP address nor a DNS name.
    #[error("--names: {0:?} is not a DNS name or an IP address")]
    BadName(String),
    /// No name was given.
    #[error("--names: give at least one DNS name or IP address")]
    NoNames,
    /// Files would be overwritten.
    #[error("{} already exist{}; pass --force to replace {}",
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if .0.len() == 1 { "s" } else { "" },
        if .0.len() == 1 { "it" } else { "them" })]
    Exists(Vec<PathBuf>),
    /// The agent's server id is not a valid one.
    #[error("--server-id: {0}")]
    BadServerId(String),
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A CA and a server certificate it signed, in PEM.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The CA certificate.
    pub ca_cert: String,
    /// The CA's private key (PKCS#8).
    pub ca_key: String,
    /// The server certificate.
    pub server_cert: String,
    /// The server's private key (PKCS#8).
    pub server_key: String,
    /// When the server certificate expires.
    pub not_after: OffsetDateTime,
}

/// Makes a fresh CA and a server certificate for `names`, valid for `days`.
pub fn generate(names: &[String], days: u32) -> Result<Generated, InitError> {
    let names = check_names(names)?;
    let now = OffsetDateTime::now_utc();
    let not_after = now + Duration::days(days.into());

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    // Each CA's name is its own (its key's identifier in it), so a client
    // trusting another install's CA is told the issuer is unknown, and an
    // operator can tell two CAs apart.
    let id: String = ca.key_identifier(&ca_key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::OrganizationName, "dcv-broker");
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("dcv-broker private CA {id} for {}", names[0]),
    );
    // It signs server and agent certificates, never other CAs.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - CLOCK_SKEW;
    ca.not_after = now + Duration::days(CA_DAYS.max(days).into());
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut server = CertificateParams::new(names.clone())?;
    server.distinguished_name = DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = now - CLOCK_SKEW;
    server.not_after = not_after;
    let server_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca, &ca_key);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    Ok(Generated {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        not_after,
    })
}

/// Each name once, in the order given; each an IP address or a DNS name
/// (a `*.` wildcard first label allowed).
fn check_names(names: &[String]) -> Result<Vec<String>, InitError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name.parse::<IpAddr>().is_err() && !is_dns_name(name) {
            return Err(InitError::BadName(name.to_string()));
        }
        if seen.insert(name.to_ascii_lowercase()) {
            out.push(name.to_string());
        }
    }
    if out.is_empty() {
        return Err(InitError::NoNames);
    }
    Ok(out)
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels = name.strip_prefix("*.").unwrap_or(name);
    name.len() <= 253
        && labels.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Writes the four files into `dir` (created if missing). Without `force`
/// nothing is written if any of them exists.
pub fn write(dir: &Path, generated: &Generated, force: bool) -> Result<Vec<PathBuf>, InitError> {
    let files = [
        (CA_CERT, &generated.ca_cert, 0o644),
        (CA_KEY, &generated.ca_key, 0o600),
        (SERVER_CERT, &generated.server_cert, 0o644),
        (SERVER_KEY, &generated.server_key, 0o600),
    ];
    let paths: Vec<PathBuf> = files.iter().map(|(name, ..)| dir.join(name)).collect();
    if !force {
        let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
        if !existing.is_empty() {
            return Err(InitError::Exists(existing));
        }
    }
    fs::create_dir_all(dir).map_err(|source| InitError::Write {
        path: dir.to_owned(),
        source,
    })?;
    for ((_, contents, mode), path) in files.iter().zip(&paths) {
        write_file(path, contents, *mode, force).map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(paths)
}

/// Writes one file with `mode` from its creation, so a key is never
/// readable by others even for a moment. Replacing goes through a
/// temporary file renamed into place, so a broker reloading on SIGHUP
/// never reads half a file.
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> io::Result<()> {
    let create = |path: &Path| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(path)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    };
    if !replace {
        return create(path);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create(&tmp)?;
    fs::rename(&tmp, path)
}

/// Runs `dcv-broker tls init`; returns what to print: the files written
/// and how to serve and call with them.
pub fn run(args: &InitArgs) -> Result<String, InitError> {
    let generated = generate(&args.names, args.days)?;
    let paths = write(&args.out, &generated, args.force)?;
    // Absolute paths, so that the printed commands work from anywhere.
    let paths: Vec<PathBuf> = paths
        .into_iter()
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .collect();
    let names = check_names(&args.names)?;
    let show = |p: &PathBuf| p.display().to_string();
    let width = paths.iter().map(|p| show(p).len()).max().unwrap_or(0);
    let first: String = match names[0].parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, 8443).to_string(),
        Err(_) => format!("{}:8443", names[0]),
    };

    let mut out = String::new();
    let mut line = |path: &PathBuf, what: &str| {
        let _ = writeln!(out, "  {:width$}  {what}", show(path));
    };
    line(
        &paths[0],
        "CA certificate: give it to clients, agents and DCV servers",
    );
    line(
        &paths[1],
        "CA private key (mode 0600): keep it offline; it can sign any name",
    );
    line(
        &paths[2],
        &format!(
            "server certificate for {}, valid until {}",
            names.join(", "),
            generated.not_after.date()
        ),
    );
    line(&paths[3], "server private key (mode 0600)");
    let mut text = format!("dcv-broker tls init wrote:\n{out}");
    let _ = write!(
        text,
        "\nServe with it (TLS allows a non-loopback --listen):\n  \
         dcv-broker --listen 0.0.0.0:8443 --tls-cert {} --tls-key {}\n\
         \nCall it, trusting the CA:\n  \
         grpcurl -cacert {} {first} list\n\
         \nReplace server.pem and server-key.pem later and send the broker SIGHUP to reload them.\n",
        show(&paths[2]),
        show(&paths[3]),
        show(&paths[0]),
    );
    Ok(text)
}

/// `dcv-broker tls agent-cert`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentCertArgs {
    /// The server id the agent acts for: the certificate's common name,
    /// and the only server a broker with --agent-ca lets it register and
    /// report for.
    #[arg(long)]
    pub server_id: String,

    /// The directory `tls init` wrote (ca.pem and ca-key.pem are read).
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,

    /// Directory to write agent-<ID>.pem and agent-<ID>-key.pem into
    /// (default: the CA directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// How many days the certificate is valid.
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,

    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// Signs a client certificate for the agent of `server_id` with the CA
/// `tls init` made: PEM certificate and key.
pub fn agent_cert(
    ca_cert: &str,
    ca_key: &str,
    server_id: &str,
    days: u32,
) -> Result<(String, String), InitError> {
    crate::fleet::validate_server_id(server_id).map_err(InitError::BadServerId)?;
    let ca_key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, &ca_key)?;
    let now = OffsetDateTime::now_utc();
    let mut agent = CertificateParams::default();
    agent.distinguished_name = DistinguishedName::new();
    agent
        .distinguished_name
        .push(DnType::CommonName, server_id.to_owned());
    agent.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A client certificate only: it cannot serve TLS as the broker.
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    agent.use_authority_key_identifier_extension = true;
    agent.not_before = now - CLOCK_SKEW;
    agent.not_after = now + Duration::days(days.into());
    let key = KeyPair::generate()?;
    let cert = agent.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Runs `dcv-broker tls agent-cert`; returns what to print.
pub fn run_agent_cert(args: &AgentCertArgs) -> Result<String, InitError> {
    let read = |name: &str| {
        let path = args.ca_dir.join(name);
        fs::read_to_string(&path).map_err(|source| InitError::Read { path, source })
    };
    let (cert, key) = agent_cert(&read(CA_CERT)?, &read(CA_KEY)?, &args.server_id, args.days)?;
    let dir = args.out.clone().unwrap_or_else(|| args.ca_dir.clone());
    // The server id is a file name here; ids with '/' get a safe name.
    let stem: String = args
        .server_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let files = [
        (dir.join(format!("agent-{stem}.pem")), cert, 0o644),
        (dir.join(format!("agent-{stem}-key.pem")), key, 0o600),
    ];
    if !args.force {
        let existing: Vec<PathBuf> = files
            .iter()
            .map(|(p, ..)| p.clone())
            .filter(|p| p.exists())
            .collect();
        if !existing.is_empty() {
            return Err(InitError::Exists(existing));
        }
    }
    fs::create_dir_all(&dir).map_err(|source| InitError::Write {
        path: dir.clone(),
        source,
    })?;
    for (path, contents, mode) in &files {
        write_file(path, contents, *mode, args.force).map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(format!(
        "dcv-broker tls agent-cert wrote:\n  {}  client certificate for server {:?}\n  {}  its private key (mode 0600)\n\n\
         Serve with --agent-ca {}: this agent may then register and report for {:?} only, without a token.\n",
        files[0].0.display(),
        args.server_id,
        files[1].0.display(),
        args.ca_dir.join(CA_CERT).display(),
        args.server_id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_ips_or_dns_names_once_each() {
        let ok = check_names(&names(&[
            "broker.example.com",
            "127.0.0.1",
            "::1",
            "*.fleet.example",
            "BROKER.example.com",
            "localhost",
        ]))
        .unwrap();
        assert_eq!(
            ok,
            [
                "broker.example.com",
                "127.0.0.1",
                "::1",
                "*.fleet.example",
                "localhost"
            ]
        );
        for bad in ["broker example", "a..b", "-a.example", "x_y.example", "a/b"] {
            assert!(
                matches!(check_names(&names(&[bad])), Err(InitError::BadName(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            check_names(&names(&["", " "])),
            Err(InitError::NoNames)
        ));
    }

    #[test]
    fn agent_certificates_name_their_server_and_chain_to_the_ca() {
        use tokio_rustls::rustls::{
            RootCertStore,
            crypto::ring::default_provider,
            pki_types::{CertificateDer, UnixTime, pem::PemObject},
            server::WebPkiClientVerifier,
        };
        let g = generate(&names(&["broker.example.com"]), 30).unwrap();
        let (cert, _key) = agent_cert(&g.ca_cert, &g.ca_key, "srv-7", 30).unwrap();
        let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(crate::tls::agent_server_id(&cert).as_deref(), Some("srv-7"));
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(g.ca_cert.as_bytes()).unwrap())
            .unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.into(), default_provider().into())
                .build()
                .unwrap();
        verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .expect("the CA signed it for client authentication");
        // The server certificate is no client certificate.
        let server = CertificateDer::from_pem_slice(g.server_cert.as_bytes()).unwrap();
        assert!(
            verifier
                .verify_client_cert(&server, &[], UnixTime::now())
                .is_err()
        );
        assert!(matches!(
            agent_cert(&g.ca_cert, &g.ca_key, "", 30),
            Err(InitError::BadServerId(_))
        ));
    }

    #[test]
    fn generates_a_ca_and_a_server_certificate_rustls_accepts() {
        use tokio_rustls::rustls::{
            crypto::ring::default_provider,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
            sign::CertifiedKey,
        };
        let g = generate(&names(&["broker.example.com", "127.0.0.1"]), 30).unwrap();
        assert!(g.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(g.ca_key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let chain = vec![CertificateDer::from_pem_slice(g.server_cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(g.server_key.as_bytes()).unwrap();
        CertifiedKey::from_der(chain, key, &default_provider()).expect("the key is the cert's");
        let days = (g.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((29..=30).contains(&days), "{days}");
    }
}
