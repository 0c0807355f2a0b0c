//! dcv-broker: a gRPC session broker for fleets of Amazon DCV servers.
//!
//! Layout:
//! - [`fleet`]: the domain. Every server the broker knows, their holds
//!   (closed state), availability and pagination. Never imports tonic.
//! - [`api`]: thin gRPC adapters (one per service) that convert between
//!   the protobuf contract and the domain, plus the one error mapping.
//! - [`server`]: composes the services, reflection, health and the server
//!   knobs, and runs them until shutdown ([`server::serve`], or
//!   [`server::serve_tls`] over TLS).
//! - [`limits`]: every limit against abusive clients in one place, and
//!   the rate and load-shedding layers that enforce them.
//! - [`layer`]: the one tower shell every request layer is built with.
//! - [`tls`]: TLS certificates from PEM files, reloadable while serving,
//!   and `dcv-broker tls init`, which makes a private CA and a certificate.
//! - [`client`]: connecting to the broker from Rust (TLS, bearer token),
//!   as `dcvsm` does.
//! - [`demo`]: a simulated fleet of agents for demos and load.
//! - [`config`] and [`telemetry`]: the binary's flags and logging.
//! - [`pb`]: generated code.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms)]

pub mod admin;
pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod demo;
pub mod fleet;
pub mod layer;
pub mod limits;
pub mod pb;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use server::{BrokerConfig, serve, serve_tls};
