//! Buying a bearer token with the OAuth 2.0 client credentials grant
//! (RFC 6749 §4.4), as `dcvsm` and `dcv-broker-agent` both do against the
//! broker's `/oauth2/token` (or another auth server).
//!
//! The HTTP client is `ureq`, blocking (callers run it on tokio's blocking
//! pool): one POST every few minutes needs no async stack, and ureq runs on
//! the ring provider tonic already uses, trusting the given CA or else the
//! system roots, as the gRPC channel does. Like the gRPC channel it ignores
//! proxy variables and follows no redirects.

use std::{fmt, sync::Arc, time::Duration};

use base64::Engine;
use serde_json::Value;

/// The token endpoint's path and grant on the broker.
pub const TOKEN_PATH_AND_QUERY: &str = "/oauth2/token?grant_type=client_credentials";
/// Whole token request, connection to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A token reply is a few hundred bytes; anything past this is not one.
const MAX_REPLY_BYTES: u64 = 64 * 1024;
/// Attempts when the auth server answers 503 (busy), honouring its
/// Retry-After up to [`MAX_RETRY_AFTER`].
const ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What to ask for.
#[derive(Clone)]
pub struct TokenRequest {
    /// The token endpoint's URL.
    pub url: String,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub secret: String,
    /// CA certificates (PEM) to trust for `https://`; None: the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any server certificate (a DCV agent's `tls_strict = false`).
    pub accept_any_certificate: bool,
    /// The User-Agent header.
    pub user_agent: String,
}

// By hand: the secret never reaches a log.
impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// What the token endpoint issued.
pub struct Issued {
    /// The bearer token.
    pub access_token: String,
    /// Its lifetime in seconds, when the server said.
    pub expires_in: Option<u64>,
    /// Its scopes, when the server said.
    pub scope: Option<String>,
}

// By hand: the token never reaches a log.
impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Why no token was issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The CA certificates are not usable.
    #[error("the CA certificates: {0}")]
    Ca(String),
    /// The server could not be reached, or its reply not read.
    #[error("cannot reach the auth server at {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server refused the credentials (401).
    #[error("the auth server refused the credentials of client {client_id:?}{detail}")]
    Refused {
        /// The client id.
        client_id: String,
        /// `: error: description`, or empty.
        detail: String,
    },
    /// The server answered another status.
    #[error("the auth server at {url} answered {status}{detail}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// `: error: description`, or empty.
        detail: String,
    },
    /// A gRPC server without a token endpoint (a broker with
    /// authentication off) answered.
    #[error("{url} is a gRPC server without a token endpoint (a broker with authentication off?)")]
    NoTokenEndpoint {
        /// The URL.
        url: String,
    },
    /// The reply is not an OAuth token.
    #[error("{url} did not answer with an OAuth token ({why}); is it a token endpoint?")]
    NotAToken {
        /// The URL.
        url: String,
        /// What is wrong with the reply.
        why: String,
    },
}

/// One token request (blocking), retried while the server says it is busy.
pub fn request_token(request: &TokenRequest) -> Result<Issued, TokenError> {
    let url = request.url.as_str();
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .user_agent(request.user_agent.as_str());
    if url.starts_with("https://") {
        config = config.tls_config(tls_config(
            request.ca_pem.as_deref(),
            request.accept_any_certificate,
        )?);
    }
    let agent: ureq::Agent = config.build().into();
    // RFC 6749 §2.3.1: each part form-encoded before base64.
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        encode(&request.client_id),
        encode(&request.secret)
    ));
    // DCV's URL carries the grant in its query; a URL without it gets it in
    // the form body (a server refuses a parameter given twice).
    let form = if url.contains("grant_type=") {
        ""
    } else {
        "grant_type=client_credentials"
    };
    let unreachable = |reason: String| TokenError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let mut attempt = 1;
    loop {
        let mut response = agent
            .post(url)
            .header("authorization", format!("Basic {basic}"))
            .header("accept", "application/json")
            .content_type("application/x-www-form-urlencoded")
            .send(form)
            .map_err(|e| unreachable(ureq_cause(&e)))?;
        let status = response.status().as_u16();
        let grpc = response.headers().contains_key("grpc-status");
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
            .min(MAX_RETRY_AFTER);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_string()
            .map_err(|e| unreachable(format!("reading the reply: {e}")))?;
        if status == 503 && attempt < ATTEMPTS {
            tracing::debug!(attempt, ?retry_after, "the auth server is busy; retrying");
            std::thread::sleep(retry_after);
            attempt += 1;
            continue;
        }
        return match status {
            200 if grpc => Err(TokenError::NoTokenEndpoint {
                url: url.to_owned(),
            }),
            200 => parse_token(url, &body),
            401 => Err(TokenError::Refused {
                client_id: request.client_id.clone(),
                detail: oauth_detail(&body),
            }),
            _ => Err(TokenError::Status {
                url: url.to_owned(),
                status,
                detail: oauth_detail(&body),
            }),
        };
    }
}

/// ureq's TLS settings: ring, and the given CA certificates or else the
/// system's roots.
fn tls_config(ca_pem: Option<&[u8]>, accept_any: bool) -> Result<ureq::tls::TlsConfig, TokenError> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
    let roots: Vec<Certificate<'static>> = match ca_pem {
        Some(pem) => {
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(pem) {
                if let PemItem::Certificate(cert) =
                    item.map_err(|e| TokenError::Ca(e.to_string()))?
                {
                    certs.push(cert);
                }
            }
            if certs.is_empty() {
                return Err(TokenError::Ca("no certificate in them".into()));
            }
            certs
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "a system root certificate was not loaded");
            }
            native
                .certs
                .iter()
                .map(|der| Certificate::from_der(der.as_ref()).to_owned())
                .collect()
        }
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&roots))
        .disable_verification(accept_any)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

/// The innermost reason a request did not get through, in a few words.
fn ureq_cause(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".to_owned()
        }
        other => other.to_string(),
    }
}

/// `: error: description` from an OAuth error body (RFC 6749 §5.2), else
/// the start of whatever the body says.
pub fn oauth_detail(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body)
        && let Some(error) = v.get("error").and_then(Value::as_str)
    {
        return match v.get("error_description").and_then(Value::as_str) {
            Some(d) => format!(": {error}: {d}"),
            None => format!(": {error}"),
        };
    }
    let line: String = body
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    if line.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", line.trim())
    }
}

/// A successful token reply (RFC 6749 §5.1).
pub fn parse_token(url: &str, body: &str) -> Result<Issued, TokenError> {
    let not_a_token = |why: &str| TokenError::NotAToken {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let v: Value = serde_json::from_str(body).map_err(|_| not_a_token("not JSON"))?;
    let access_token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| not_a_token("no access_token"))?;
    match v.get("token_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        other => {
            return Err(not_a_token(&format!(
                "token_type {:?}, not Bearer",
                other.unwrap_or("")
            )));
        }
    }
    // A number by the RFC; some servers send it as a string.
    let expires_in = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(Issued {
        access_token: access_token.to_owned(),
        expires_in,
        scope: v.get("scope").and_then(Value::as_str).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_replies_and_errors() {
        let ok = parse_token(
            "u",
            r#"{"access_token":"a","token_type":"bearer","expires_in":"60"}"#,
        )
        .unwrap();
        assert_eq!(ok.expires_in, Some(60));
        assert!(!format!("{ok:?}").contains("\"a\""));
        assert!(parse_token("u", r#"{"access_token":"a","token_type":"mac"}"#).is_err());
        assert!(parse_token("u", "<html>").is_err());
        assert_eq!(
            oauth_detail(r#"{"error":"invalid_client","error_description":"no"}"#),
            ": invalid_client: no"
        );
        assert_eq!(oauth_detail(""), "");
    }
}
