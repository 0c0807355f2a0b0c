//! dcv-broker: a gRPC session broker for fleets of Amazon DCV servers.
//!
//! Layout, from the contract inwards:
//! - [`pb`]: generated code for the protobuf contract (the contract itself
//!   is `proto/`).
//! - [`server`]: composes the services, reflection, health and the server
//!   knobs, and runs them until shutdown ([`server::serve`], or
//!   [`server::serve_tls`] over TLS); [`server::connections`] caps, reaps
//!   and drains connections.
//! - [`api`]: thin gRPC adapters (one per service), the authorization layer
//!   and token endpoint, the HTTP gate, request ids, and the one mapping
//!   from domain errors to gRPC statuses.
//! - [`wire`]: the conversions between the protobuf contract and the
//!   domain, shared by [`api`] and [`store`].
//! - [`transport`]: what the layers read off a request's transport (the
//!   peer's address, the health and reflection paths, gRPC content types).
//! - [`limits`]: every limit against abusive clients in one place, and the
//!   rate and load-shedding layers that enforce them.
//! - [`metrics`]: Prometheus metrics (`GET /metrics`): the per-request
//!   layer, the process-wide counters, and the fleet read at scrape time.
//! - [`layer`]: the one tower shell every request layer is built with.
//! - [`auth`]: API and agent clients, their scopes and the bearer tokens
//!   the broker issues; never sees the network.
//! - [`fleet`]: the domain. Servers, holds, availability, pagination,
//!   sessions, placement and the queue. Never imports tonic or prost.
//! - [`store`]: the durable SQLite store behind the fleet's `Store` trait,
//!   and [`store::postgres`], the same on PostgreSQL (`--database-url`).
//! - [`cluster`]: several brokers on one PostgreSQL database: the leader,
//!   the followers, and the view of the role every layer reads.
//! - [`tls`]: TLS certificates from PEM files, reloadable while serving;
//!   [`tls::init`] makes a private CA and certificates (`dcv-broker tls`).
//! - [`admin`]: `dcv-broker clients`, over the admin socket of a running
//!   broker or on the store of a stopped one; [`backup`]: `dcv-broker
//!   backup`, a running broker's store copied through that socket.
//! - [`client`]: connecting to the broker from Rust (TLS, bearer token,
//!   client certificate), as `dcvsm` and `dcv-broker-agent` do;
//!   [`oauth`]: buying their bearer tokens (client credentials grant).
//! - [`demo`]: a simulated fleet of agents for demos and load;
//!   [`sample`]: the deterministic server descriptions it registers, which
//!   tests and benchmarks reuse.
//! - [`audit`]: the audit log's JSON-lines sink and the pruning of the
//!   records the store keeps (the adapters build them: `api::audit`).
//! - [`config`] and [`telemetry`]: the binary's flags, and logging;
//!   [`table`]: the aligned text tables of `dcvsm` and `dcv-broker clients`;
//!   [`notify`]: systemd's readiness, stopping and watchdog notifications.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod layer;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod pb;
pub mod sample;
pub mod server;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;

pub use server::{BrokerConfig, serve, serve_tls};
