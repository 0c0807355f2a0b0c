//! Thin gRPC adapters over the fleet: each converts protobuf requests into
//! domain calls (rejecting malformed input at the edge) and domain results
//! back into DCV-shaped responses.

pub mod agent;
pub mod convert;
pub mod error;
pub mod request_id;
pub mod servers;
pub mod sessions;

pub use agent::AgentApi;
pub use request_id::{RequestId, RequestSpanLayer};
pub use servers::ServersApi;
pub use sessions::SessionsApi;

/// The identity recorded as the actor of a close until authentication
/// exists: every caller is the same anonymous client.
pub const ANONYMOUS_ACTOR: &str = "anonymous";
