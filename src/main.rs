//! The `dcv-broker` binary: parses flags, starts logging, binds the
//! listener, and serves until SIGTERM or SIGINT; or runs a subcommand
//! (`dcv-broker tls init`).

use std::{process::ExitCode, sync::Arc, time::Instant};

use dcv_broker::{
    admin::{self, AdminSocket},
    audit::{self, AuditLog, AuditOnly, AuditedStore},
    auth::{Auth, ScopeSet},
    cluster::{ClusterStore, ClusterView, Replica},
    config::{self, Args, ClientsCommand, Command, ConfigCommand, LogFormat, TlsCommand},
    fleet::{
        Fleet,
        persist::{MemoryStore, Snapshot},
    },
    notify,
    server::{agent_port::AgentPort, connections, serve_until, serve_with_agent_port},
    store::{
        SqliteStore,
        postgres::{ClusterOptions, Database, FORWARDING_KEY},
    },
    telemetry,
    tls::{self, ServerTls},
};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    // Flags, then the environment, then --config's file, then defaults.
    let args = match config::file::parse(config::dcv_spellings(std::env::args_os())) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("dcv-broker: {err}");
            return ExitCode::FAILURE;
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dcv-broker: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if let Some(Command::Tls {
        command: TlsCommand::Init(init),
    }) = &args.command
    {
        print!("{}", tls::init::run(init).map_err(|e| e.to_string())?);
        return Ok(());
    }
    if let Some(Command::Tls {
        command: TlsCommand::AgentCert(agent),
    }) = &args.command
    {
        print!(
            "{}",
            tls::init::run_agent_cert(agent).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    if let Some(Command::Config { command }) = &args.command {
        match command {
            ConfigCommand::Check { config } => {
                // The settings it gives, each with its origin.
                print!("{}", config::file::check(config)?);
            }
            ConfigCommand::Defaults => print!("{}", config::file::defaults()),
        }
        return Ok(());
    }
    if let Some(Command::Clients { command }) = &args.command {
        // Warnings only (a store others could read, say): the reply is
        // the output.
        telemetry::init(LogFormat::Text, "warn")?;
        return clients(command).await;
    }
    if let Some(Command::Backup {
        out,
        force,
        location,
    }) = &args.command
    {
        telemetry::init(LogFormat::Text, "warn")?;
        let socket = location
            .admin_socket
            .clone()
            .unwrap_or_else(|| location.data_dir.join(admin::SOCKET_NAME));
        let written = dcv_broker::backup::run(&socket, &location.data_dir, out, *force).await?;
        print!("{}", dcv_broker::backup::render(&written, location.json));
        return Ok(());
    }
    if let Some(Command::RegisterApiClient {
        client_name,
        location,
    }) = &args.command
    {
        telemetry::init(LogFormat::Text, "warn")?;
        return register_api_client(client_name, location).await;
    }
    args.check()?;
    let rust_log = std::env::var("RUST_LOG").ok();
    // Inside the runtime, which carries the exporter's connection.
    let otlp = args
        .otlp_endpoint
        .as_deref()
        .map(telemetry::otlp::Exporter::start)
        .transpose()?;
    telemetry::init_exporting(
        args.log_format,
        &telemetry::directives(args.log.as_deref(), rust_log.as_deref()),
        otlp.as_ref(),
    )?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let mut tls = ServerTls::load(cert, key).map_err(|e| format!("TLS: {e}"))?;
            if let Some(ca) = &args.agent_ca {
                tls = tls
                    .with_agent_ca(ca)
                    .map_err(|e| format!("agent CA: {e}"))?;
            }
            // Installed before the port is announced, like the handlers
            // below: SIGHUP's default action would kill the broker.
            #[cfg(unix)]
            tls::reload_on_sighup(tls.clone()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
            Some(tls)
        }
        _ => None,
    };
    // Signal handlers go in before the port is announced: a supervisor may
    // send SIGTERM the moment it sees the line.
    let signals = shutdown_signals().map_err(|e| format!("cannot watch signals: {e}"))?;
    let mut config = args.broker_config();
    let registry;
    // With --database-url: what the cluster controller needs once the port
    // is bound (it advertises the bound address).
    let mut replica = None;
    // The JSON-lines copy of the audit log, teed off every store below.
    let audit_log = match &args.audit_log {
        Some(dest) => Some(
            AuditLog::open(&audit::Destination::parse(dest))
                .map_err(|e| format!("cannot open the audit log {dest}: {e}"))?,
        ),
        None => None,
    };
    // What `dcv-broker backup` copies, set with the store below.
    let mut backups = dcv_broker::backup::Source::InMemory;
    let (fleet, store_failed) = if args.in_memory {
        tracing::warn!("--in-memory: nothing is stored; a restart forgets every server and close");
        let store = AuditedStore::wrap(Arc::new(MemoryStore), audit_log.as_ref());
        let fleet = Fleet::restore(config.fleet.clone(), store.clone(), Snapshot::default())
            .map_err(|e| e.to_string())?;
        registry = Auth::restore(args.auth_config(), store, &Snapshot::default())
            .await
            .map_err(|e| format!("authentication: {e}"))?;
        (fleet, None)
    } else if let Some(url) = &args.database_url {
        let started = Instant::now();
        let db = Database::connect(&url.0).await.map_err(|e| e.to_string())?;
        let (snapshot, seq) = db.snapshot().await.map_err(|e| e.to_string())?;
        let (servers, sessions) = (snapshot.servers.len(), snapshot.sessions.len());
        let node = args
            .node_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let view = ClusterView::clustered(node.clone());
        let key = snapshot
            .secrets
            .iter()
            .find(|(name, _)| name == FORWARDING_KEY)
            .and_then(|(_, key)| <[u8; 32]>::try_from(key.as_slice()).ok())
            .ok_or_else(|| {
                format!(
                    "PostgreSQL database {}: no valid {FORWARDING_KEY}",
                    db.target()
                )
            })?;
        view.set_forwarding_key(key);
        // Every replica writes through this one store, which the
        // controller points at the leader's fenced writer while this
        // replica leads and which refuses writes otherwise.
        let store = Arc::new(ClusterStore::new());
        store.set_audit_reader({
            let db = db.clone();
            Arc::new(move |filter| {
                let db = db.clone();
                Box::pin(async move { db.read_audit(&filter).await.map_err(|e| e.to_string()) })
            })
        });
        let audited = AuditedStore::wrap(store.clone(), audit_log.as_ref());
        registry = Auth::restore(args.auth_config(), audited.clone(), &snapshot)
            .await
            .map_err(|e| format!("authentication: {e}"))?;
        let fleet =
            Fleet::restore(config.fleet.clone(), audited, snapshot).map_err(|e| e.to_string())?;
        // Nothing runs on its own, and no client is registered, before the
        // controller decides the role.
        fleet.set_writable(false);
        registry.set_writable(false);
        view.reset_applied(seq);
        tracing::info!(
            store = %format!("postgres://{}", db.target()),
            node = %node,
            servers,
            sessions,
            seq,
            elapsed = ?started.elapsed(),
            "store loaded"
        );
        config.cluster = view.clone();
        backups = dcv_broker::backup::Source::Postgres;
        replica = Some((db, store, view, seq));
        (fleet, None)
    } else {
        let started = Instant::now();
        let (store, snapshot) = SqliteStore::open(&args.data_dir).map_err(|e| e.to_string())?;
        let failed = store.failed();
        backups = dcv_broker::backup::Source::Sqlite(store.clone());
        let store = AuditedStore::wrap(Arc::new(store), audit_log.as_ref());
        let location = args.data_dir.display().to_string();
        let (servers, sessions) = match config.demo_fleet {
            0 => (snapshot.servers.len(), snapshot.sessions.len()),
            _ => (0, 0),
        };
        registry = Auth::restore(args.auth_config(), store.clone(), &snapshot)
            .await
            .map_err(|e| format!("authentication: {e}"))?;
        // Simulated servers must not outlive the process that simulates
        // them (a later run would show them again, silent, for an hour):
        // a demo's fleet lives in memory. Its clients, bearer-token key and
        // audit log are real and stay in the store.
        let fleet = if config.demo_fleet > 0 {
            tracing::warn!(
                store = %location,
                "--demo-fleet: servers, holds and sessions are kept in memory only; \
                 the store keeps API clients, the token-signing key and the audit log"
            );
            Fleet::restore(
                config.fleet.clone(),
                Arc::new(AuditOnly::new(store)),
                Snapshot::default(),
            )
        } else {
            Fleet::restore(config.fleet.clone(), store, snapshot)
        }
        .map_err(|e| e.to_string())?;
        tracing::info!(
            store = %location,
            servers,
            sessions,
            elapsed = ?started.elapsed(),
            "store loaded"
        );
        (fleet, Some(failed))
    };
    if args.auth_enabled() {
        config.auth = Some(registry.clone());
    }
    if args.metrics {
        config.metrics = Some(dcv_broker::metrics::Metrics::new(
            fleet.clone(),
            config.cluster.clone(),
        ));
    }
    // Whoever writes prunes: a follower's fleet submits nothing.
    let _audit_pruning = AbortOnDrop(tokio::spawn(audit::prune_periodically(
        fleet.clone(),
        args.audit_retention,
        audit::PRUNE_EVERY,
    )));
    // After the store opened: a store refused at start is reported in its
    // one line, with nothing else said before it.
    let mut agent_connections = connections::ConnectionLimits {
        max_connections: args.agent_max_connections,
        ..config.connections
    };
    if args.agent_listen.is_some() {
        (config.connections, agent_connections) =
            connections::fit_two_to_fd_limit(config.connections, agent_connections);
    } else {
        config.connections = connections::fit_to_fd_limit(config.connections);
    }
    // Bound before the port is announced, so that `dcv-broker clients`
    // works as soon as the broker is up.
    if args.database_url.is_some()
        && args.admin_socket.is_none()
        && let Some(path) = args.admin_socket_path()
        && let Some(dir) = path.parent()
    {
        // With PostgreSQL the data directory holds only the admin socket,
        // and nothing else may have made it: it is created private.
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let admin =
        match args.admin_socket_path() {
            Some(path) => Some(AdminSocket::bind(&path).await.map_err(|e| {
                format!("cannot listen on the admin socket {}: {e}", path.display())
            })?),
            None => None,
        };
    let _admin_task = admin.map(|socket| {
        tracing::info!(path = %socket.path().display(), "admin socket listening");
        AbortOnDrop(tokio::spawn(socket.serve(registry.clone(), backups)))
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    // A replica takes its first role (and, as leader, reloads) before it
    // says it is up: a broker that announced itself answers with current
    // state, or forwards to one that does.
    let controller = match replica {
        Some((db, store, view, seq)) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let options = ClusterOptions {
                node: view.node().to_owned(),
                advertise: args
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{addr}")),
                lease: args.leader_lease,
            };
            let replica = Replica {
                db,
                options,
                fleet: fleet.clone(),
                auth: registry.clone(),
                store,
                view,
            };
            Some(
                replica
                    .start(seq)
                    .await
                    .map_err(|e| format!("cannot join the replicas: {e}"))?,
            )
        }
        None => None,
    };
    // The first line on stdout: scripts read the port from it.
    println!("dcv-broker listening on {addr}");
    let agent_port = match args.agent_listen {
        Some(at) => {
            let listener = std::net::TcpListener::bind(at)
                .map_err(|e| format!("cannot listen on {at} (--agent-listen): {e}"))?;
            let agents_addr = listener
                .local_addr()
                .map_err(|e| format!("cannot read the agents' listening address: {e}"))?;
            println!("dcv-broker agents listening on {agents_addr}");
            tracing::info!(
                addr = %agents_addr,
                threads = args.agent_threads,
                nice = args.agent_nice,
                max_connections = agent_connections.max_connections,
                "serving agents apart (the main address serves them too)"
            );
            Some(AgentPort {
                listener,
                threads: args.agent_threads,
                nice: args.agent_nice,
                connections: agent_connections,
            })
        }
        None => None,
    };
    let _metrics_port = match (args.metrics_listen, &config.metrics) {
        (Some(at), Some(metrics)) => {
            let listener = TcpListener::bind(at)
                .await
                .map_err(|e| format!("cannot listen on {at} (--metrics-listen): {e}"))?;
            let metrics_addr = listener
                .local_addr()
                .map_err(|e| format!("cannot read the metrics' listening address: {e}"))?;
            println!("dcv-broker metrics listening on {metrics_addr}");
            tracing::info!(addr = %metrics_addr, "serving GET /metrics apart");
            Some(AbortOnDrop(tokio::spawn(
                dcv_broker::metrics::serve_metrics(listener, metrics.clone()),
            )))
        }
        _ => None,
    };
    // Every port is bound, the store loaded and a replica's role taken:
    // systemd may start what depends on the broker.
    notify::ready(&format!("serving on {addr}"));
    let _watchdog = notify::watchdog().map(AbortOnDrop);
    tracing::info!(%addr, demo_fleet = config.demo_fleet, tls = tls.is_some(), "serving");
    if let Some(tls) = &tls {
        tracing::info!(
            cert = %tls.cert_path().display(),
            sha256 = %tls.fingerprint(),
            agent_ca = tls.agent_ca_path().map(|p| p.display().to_string()),
            "TLS only; SIGHUP reloads the certificate and key"
        );
    } else {
        tracing::warn!(
            %addr,
            "serving PLAINTEXT gRPC: traffic (and any token) crosses the network unencrypted. \
             Serve TLS with --tls-cert and --tls-key"
        );
    }
    match &config.auth {
        Some(auth) => tracing::info!(
            clients = auth.list().iter().filter(|c| c.revoked_at.is_none()).count(),
            token_ttl = ?args.token_ttl,
            "authentication on: every call needs a bearer token from POST /oauth2/token \
             (register clients with `dcv-broker clients register`)"
        ),
        None => tracing::warn!(
            %addr,
            "authentication OFF: anyone who can reach {addr} can call every RPC, \
             close every server and start desktops. Turn it on with --auth on (or TLS)"
        ),
    }
    let (mut first, mut second) = (signals.clone(), signals);
    let shutdown = async move {
        let _ = first.wait_for(|n| *n >= 1).await;
    };
    let hurry = async move {
        let _ = second.wait_for(|n| *n >= 2).await;
    };
    let mut failed = store_failed.clone();
    let stop = async move {
        match failed.as_mut() {
            // A store that cannot write stops the broker: nothing more may
            // be acknowledged, and a restart reloads what is on disk.
            Some(failed) => tokio::select! {
                () = shutdown => notify::stopping("shutting down: draining"),
                _ = failed.wait_for(Option::is_some) => notify::stopping("stopping: the store failed"),
            },
            None => {
                shutdown.await;
                notify::stopping("shutting down: draining");
            }
        }
    };
    match agent_port {
        Some(agents) => {
            serve_with_agent_port(listener, agents, fleet, config, tls, stop, hurry).await
        }
        None => serve_until(listener, fleet, config, tls, stop, hurry).await,
    }
    .map_err(|e| e.to_string())?;
    // Drained: a leader hands its lease over now rather than let the
    // others wait for it to lapse.
    if let Some(controller) = controller {
        controller.resign().await;
    }
    if let Some(otlp) = otlp {
        // The flush blocks (with its own deadline) on the exporter's
        // thread, whose sends the runtime's workers carry.
        match tokio::task::spawn_blocking(move || otlp.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => tracing::warn!("{why}"),
            Err(e) => tracing::warn!(error = %e, "OTLP: the last spans may be lost"),
        }
    }
    if let Some(why) = store_failed.and_then(|f| f.borrow().clone()) {
        return Err(format!("stopped: the store failed: {why}"));
    }
    Ok(())
}

/// Stops a background task (and drops what it owns) when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `dcv-broker clients ...`: through the running broker's admin socket, or
/// on its store.
async fn clients(command: &ClientsCommand) -> Result<(), String> {
    let (request, location) = match command {
        ClientsCommand::Register {
            name,
            scopes,
            server_id,
            location,
        } => (
            admin::Request::Register {
                name: name.clone(),
                scopes: *scopes,
                server_id: server_id.clone(),
            },
            location,
        ),
        ClientsCommand::List { location } => (admin::Request::List, location),
        ClientsCommand::Revoke {
            client_id,
            location,
        } => (
            admin::Request::Revoke {
                client_id: client_id.clone(),
            },
            location,
        ),
    };
    let reply = admin::run(
        &location.data_dir,
        location.admin_socket.as_deref(),
        &request,
    )
    .await
    .map_err(|e| e.to_string())?;
    print!("{}", admin::render(&request, &reply, location.json));
    Ok(())
}

/// `dcv-broker register-api-client`: `clients register` with a DCV API
/// client's scopes, answering in DCV's two lines (set-up tools parse them).
async fn register_api_client(name: &str, location: &config::AdminLocation) -> Result<(), String> {
    let request = admin::Request::Register {
        name: name.to_owned(),
        scopes: ScopeSet::DCV_API_CLIENT,
        server_id: None,
    };
    let reply = admin::run(
        &location.data_dir,
        location.admin_socket.as_deref(),
        &request,
    )
    .await
    .map_err(|e| e.to_string())?;
    let out = if location.json {
        admin::render(&request, &reply, true)
    } else {
        admin::render_dcv_registration(&reply)?
    };
    print!("{out}");
    Ok(())
}

/// Installs SIGTERM and SIGINT handlers now; the receiver counts the
/// signals received: the first starts the shutdown, the second cuts it
/// short.
#[cfg(unix)]
fn shutdown_signals() -> std::io::Result<tokio::sync::watch::Receiver<u32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (count, counted) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                Some(()) = term.recv() => "SIGTERM",
                Some(()) = interrupt.recv() => "SIGINT",
                else => return,
            };
            count.send_modify(|n| *n += 1);
            tracing::info!(signal = name, count = *count.borrow(), "{name} received");
        }
    });
    Ok(counted)
}

/// Counts Ctrl-C presses, like the Unix signals.
#[cfg(not(unix))]
fn shutdown_signals() -> std::io::Result<tokio::sync::watch::Receiver<u32>> {
    let (count, counted) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            count.send_modify(|n| *n += 1);
        }
    });
    Ok(counted)
}
