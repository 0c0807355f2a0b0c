//! Thin gRPC adapters over the fleet: each converts protobuf requests into
//! domain calls (rejecting malformed input at the edge) and domain results
//! back into DCV-shaped responses.

pub mod agent;
pub mod audit;
pub mod auth;
pub mod codec;
pub mod error;
pub mod forward;
pub mod gate;
pub mod idempotency;
pub mod oauth;
pub mod request_id;
pub mod rest;
pub mod servers;
pub mod sessions;
pub mod verifier;
pub mod watch_stream;

pub use agent::AgentApi;
pub use auth::{AuthLayer, OpenServices};
pub use forward::Forwarder;
pub use gate::HttpGateLayer;
pub use request_id::{RequestId, RequestSpanLayer};
pub use servers::ServersApi;
pub use sessions::SessionsApi;

/// The identity recorded as the actor of a close when the broker runs
/// without authentication: every caller is the same anonymous client.
pub const ANONYMOUS_ACTOR: &str = "anonymous";
