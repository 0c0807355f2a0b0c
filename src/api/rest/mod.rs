//! DCV's REST wire format on the broker's port: DCV Session Manager's
//! routes, decoded into the same requests the gRPC services take.

pub mod handler;
pub mod json;
pub mod routes;

pub use handler::RestLayer;
pub use routes::{ROUTES, RequestBody, Route};
