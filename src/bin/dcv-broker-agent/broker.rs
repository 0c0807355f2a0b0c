//! The conversation with the broker over the Agent service: connect (TLS,
//! client certificate, OAuth bearer token), register, report at once what
//! runs, keep the instruction stream open while heartbeating at the
//! interval the broker asks for, and report each instruction's result.
//! NOT_FOUND (the broker forgot this server) means register again; any
//! other failure means reconnect, with jittered exponential backoff,
//! forever, until told to stop.
//!
//! A normal stop does not call DeregisterServer: the agent is stopped for
//! a restart or an upgrade far more often than for good, and a server that
//! deregisters is forgotten with its sessions' placement; a server whose
//! agent is merely silent stays known (UNREACHABLE_AGENT) and comes back
//! whole when the agent returns.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, watch};
use tonic::{Code, Status};

use dcv_broker::{
    client::{self, BrokerClient},
    oauth::{self, TokenRequest},
    pb,
};

use crate::{
    config::Config,
    facts,
    instructions::Executor,
    observe::{self, Observer},
};

/// Connecting (TCP and TLS) may take this long before the attempt counts
/// as failed and backs off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each unary call to the broker (register, heartbeat, report): a broker
/// that has not answered in 15 s is treated as gone, so a hung connection
/// never stops the heartbeats for longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The first reconnect delay; doubled per failure up to `reconnect_max_delay`.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Heartbeat intervals the broker may ask for; anything outside is clamped
/// (a zero interval would spin, an hour-long one would look dead).
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);
/// When the broker names no interval.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Instructions carried out at once: beyond this the stream is not read
/// until one finishes (each runs a `dcv` child).
pub const MAX_CONCURRENT_INSTRUCTIONS: usize = 32;
/// On SIGTERM, how long instructions under way may finish before their
/// `dcv` children are killed: a create cut short leaves DCV half-way.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A token is renewed once this share (percent) of its lifetime has passed.
const RENEW_AT_PERCENT: u64 = 80;
/// A token without `expires_in` is renewed after this long.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Everything the conversation needs.
pub struct Agent {
    pub config: Arc<Config>,
    pub server_id: String,
    pub executor: Arc<Executor>,
    pub observer: Arc<Observer>,
    /// The poll interval, following the heartbeat interval.
    pub poll_every: watch::Sender<Duration>,
    /// One permit per instruction under way ([`MAX_CONCURRENT_INSTRUCTIONS`]).
    pub slots: Arc<Semaphore>,
}

/// Bearer tokens from the broker's token endpoint, renewed before expiry.
struct Tokens {
    request: Option<TokenRequest>,
    current: Option<(String, Instant)>,
}

impl Tokens {
    fn new(config: &Config) -> Tokens {
        let request = config
            .credentials
            .client
            .as_ref()
            .map(|(id, secret)| TokenRequest {
                url: format!("{}{}", config.broker_url, oauth::TOKEN_PATH_AND_QUERY),
                client_id: id.clone(),
                secret: secret.clone(),
                ca_pem: config.ca_pem.clone(),
                accept_any_certificate: !config.tls_strict,
                user_agent: concat!("dcv-broker-agent/", env!("CARGO_PKG_VERSION")).into(),
            });
        Tokens {
            request,
            current: None,
        }
    }

    fn due(&self) -> bool {
        self.request.is_some()
            && self
                .current
                .as_ref()
                .is_none_or(|(_, renew)| Instant::now() >= *renew)
    }

    /// The token to send: the current one, or a new one when it is due.
    async fn get(&mut self) -> Result<Option<String>, String> {
        let Some(request) = self.request.clone() else {
            return Ok(None);
        };
        if !self.due()
            && let Some((token, _)) = &self.current
        {
            return Ok(Some(token.clone()));
        }
        let issued = tokio::task::spawn_blocking(move || oauth::request_token(&request))
            .await
            .map_err(|e| format!("the token request failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let lifetime = issued
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let renew = Instant::now() + lifetime * RENEW_AT_PERCENT as u32 / 100;
        tracing::debug!(expires_in = ?issued.expires_in, "bearer token obtained");
        self.current = Some((issued.access_token.clone(), renew));
        Ok(Some(issued.access_token))
    }

    fn forget(&mut self) {
        self.current = None;
    }
}

/// Why a connection ended.
enum Lost {
    /// The broker does not know this server: register again.
    NotFound,
    /// Anything else: reconnect after a delay.
    Broken(String),
}

impl From<Status> for Lost {
    fn from(s: Status) -> Lost {
        if s.code() == Code::NotFound {
            Lost::NotFound
        } else {
            Lost::Broken(describe(&s))
        }
    }
}

fn describe(s: &Status) -> String {
    let message = s.message().trim();
    let mut text = format!("{:?}", s.code());
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    if let Some(source) = std::error::Error::source(s) {
        text.push_str(": ");
        text.push_str(&chain(source));
    }
    text
}

/// An error and its sources on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

/// A unary call with [`CALL_TIMEOUT`].
async fn call<T>(f: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, Status> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer in {}s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// The delay before reconnect attempt `failures` (0-based): doubling from
/// [`FIRST_RETRY_DELAY`] up to `cap`, then a random point in its upper half
/// so that a fleet does not return all at once.
pub fn backoff(failures: u32, cap: Duration) -> Duration {
    let full = FIRST_RETRY_DELAY
        .saturating_mul(1u32 << failures.min(16))
        .min(cap);
    let half = full / 2;
    let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    let random = getrandom::u64().unwrap_or(0) % spread;
    half + Duration::from_millis(random)
}

/// Connects to the broker as the configuration says.
async fn connect(config: &Config, token: Option<String>) -> Result<BrokerClient, String> {
    let mut builder = client::builder(&config.broker_url).connect_timeout(CONNECT_TIMEOUT);
    if let Some(pem) = &config.ca_pem {
        builder = builder.ca_pem(pem.clone());
    }
    if let Some((cert, key)) = &config.credentials.identity {
        builder = builder.identity_pem(cert.clone(), key.clone());
    }
    if !config.tls_strict {
        builder = builder.accept_any_server_certificate();
    }
    if let Some(token) = token {
        builder = builder.token(token);
    }
    builder.connect().await.map_err(|e| chain(&e))
}

/// `dcv-broker-agent check`: connect once and ask the broker's health
/// service, with the configured credentials.
pub async fn check(config: &Config) -> Result<(), String> {
    let token = Tokens::new(config).get().await?;
    let broker = connect(config, token).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel());
    let reply = call(health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .map_err(|s| format!("the broker's health check failed: {}", describe(&s)))?;
    if reply.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!(
            "the broker is not serving (status {})",
            reply.status
        ))
    }
}

impl Agent {
    /// Waits (up to [`STOP_GRACE`]) for the instructions under way.
    pub async fn finish_instructions(&self) {
        let all = u32::try_from(MAX_CONCURRENT_INSTRUCTIONS).unwrap_or(u32::MAX);
        if tokio::time::timeout(STOP_GRACE, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "instructions still under way after {}s; stopping their dcv commands",
                STOP_GRACE.as_secs()
            );
        }
    }

    /// Talks to the broker until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tokens = Tokens::new(&self.config);
        let mut failures: u32 = 0;
        loop {
            let mut registered = false;
            let lost = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                reason = self.connect_and_serve(&mut tokens, &mut registered) => reason,
            };
            if registered {
                failures = 0;
            }
            let delay = backoff(failures, self.config.reconnect_max_delay);
            failures = failures.saturating_add(1);
            tracing::warn!(
                "broker unreachable ({}): {lost}; retrying in {}",
                self.config.broker_url,
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
                ))
            );
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: returns why it ended.
    async fn connect_and_serve(&self, tokens: &mut Tokens, registered: &mut bool) -> String {
        let token = match tokens.get().await {
            Ok(t) => t,
            Err(e) => return e,
        };
        let broker = match connect(&self.config, token).await {
            Ok(b) => b,
            Err(e) => return e,
        };
        loop {
            match self.serve(&broker, tokens, registered).await {
                Lost::NotFound => {
                    tracing::info!("the broker does not know this server; registering again");
                }
                Lost::Broken(reason) => {
                    if reason.starts_with("Unauthenticated") {
                        tokens.forget();
                    }
                    return reason;
                }
            }
        }
    }

    /// Registers, reports, and keeps the stream and the heartbeats going.
    async fn serve(
        &self,
        broker: &BrokerClient,
        tokens: &mut Tokens,
        registered: &mut bool,
    ) -> Lost {
        let registration = facts::registration(&self.config, &self.server_id).await;
        let reply = match call(broker.agent().register_server(registration)).await {
            Ok(r) => r,
            Err(s) => return Lost::Broken(describe(&s)),
        };
        *registered = true;
        tracing::info!("registered server_id={}", self.server_id);
        let mut interval = interval_of(reply.heartbeat_interval);
        self.poll_every.send_replace(interval);
        // What actually runs, before anything else: after a restart of
        // either side the broker learns the truth at once.
        let first_wait = self.config.dcv_command_timeout + Duration::from_secs(1);
        self.observer.first_snapshot(first_wait).await;
        let shared = Arc::new(Mutex::new(broker.clone()));
        if let Err(lost) = self.heartbeat(&shared, &mut interval).await {
            return lost;
        }
        let request = pb::StreamInstructionsRequest {
            server_id: self.server_id.clone(),
        };
        let stream = match call(broker.agent().stream_instructions(request)).await {
            Ok(s) => s,
            Err(s) => return s.into(),
        };
        tracing::info!("instruction stream open");
        tokio::select! {
            lost = self.read_instructions(stream, shared.clone()) => lost,
            lost = self.heartbeats(&shared, tokens, interval) => lost,
        }
    }

    async fn heartbeat(
        &self,
        broker: &Arc<Mutex<BrokerClient>>,
        interval: &mut Duration,
    ) -> Result<(), Lost> {
        let snapshot = self.observer.snapshot().unwrap_or_default();
        let load = facts::load();
        let request = pb::HeartbeatRequest {
            server_id: self.server_id.clone(),
            dcv_server_healthy: snapshot.healthy,
            logged_in_users: snapshot.users,
            sessions: observe::reported_sessions(&snapshot.sessions),
            cpu_load_average: Some(load.cpu_load_average),
            memory: Some(load.memory),
            swap: Some(load.swap),
        };
        let client = lock(broker).clone();
        let reply = call(client.agent().heartbeat(request)).await?;
        let asked = interval_of(reply.heartbeat_interval);
        if asked != *interval {
            *interval = asked;
            self.poll_every.send_replace(asked);
        }
        Ok(())
    }

    async fn heartbeats(
        &self,
        broker: &Arc<Mutex<BrokerClient>>,
        tokens: &mut Tokens,
        mut interval: Duration,
    ) -> Lost {
        loop {
            tokio::time::sleep(interval).await;
            if tokens.due() {
                match tokens.get().await {
                    Ok(token) => {
                        let renewed = lock(broker).with_token(token.as_deref());
                        match renewed {
                            Ok(b) => *lock(broker) = b,
                            Err(e) => return Lost::Broken(e.to_string()),
                        }
                    }
                    Err(e) => return Lost::Broken(e),
                }
            }
            if let Err(lost) = self.heartbeat(broker, &mut interval).await {
                return lost;
            }
        }
    }

    async fn read_instructions(
        &self,
        mut stream: tonic::Streaming<pb::StreamInstructionsResponse>,
        broker: Arc<Mutex<BrokerClient>>,
    ) -> Lost {
        loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Lost::Broken("the broker closed the instruction stream".into()),
                Err(s) => return s.into(),
            };
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return Lost::Broken("instruction slots closed".into());
            };
            let executor = self.executor.clone();
            let server_id = self.server_id.clone();
            let client = lock(&broker).clone();
            // Each instruction in its own task: a hung `dcv` holds its
            // session's turn and one slot, never the stream or heartbeats.
            tokio::spawn(async move {
                let _slot = slot;
                let Some(mut report) = executor.carry_out(message).await else {
                    return;
                };
                report.server_id = server_id;
                let id = report.instruction_id.clone();
                if let Err(s) = call(client.agent().report_instruction_result(report)).await {
                    tracing::warn!(
                        "cannot report instruction {id}: {}; the broker will send it again",
                        describe(&s)
                    );
                }
            });
        }
    }
}

fn lock(m: &Mutex<BrokerClient>) -> std::sync::MutexGuard<'_, BrokerClient> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn interval_of(d: Option<prost_types::Duration>) -> Duration {
    d.and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(DEFAULT_HEARTBEAT)
        .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let cap = Duration::from_secs(30);
        for failures in 0..40 {
            let full = FIRST_RETRY_DELAY
                .saturating_mul(1u32 << failures.min(16))
                .min(cap);
            let d = backoff(failures, cap);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
        }
        assert!(backoff(0, cap) <= Duration::from_secs(1));
        assert!(backoff(10, Duration::from_secs(2)) <= Duration::from_secs(2));
    }

    #[test]
    fn heartbeat_intervals_are_clamped() {
        assert_eq!(interval_of(None), DEFAULT_HEARTBEAT);
        let zero = prost_types::Duration {
            seconds: 0,
            nanos: 0,
        };
        assert_eq!(interval_of(Some(zero)), MIN_HEARTBEAT);
        let day = prost_types::Duration {
            seconds: 86400,
            nanos: 0,
        };
        assert_eq!(interval_of(Some(day)), MAX_HEARTBEAT);
    }
}
