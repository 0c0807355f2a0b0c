//! DCV's REST wire format on the broker's port: DCV Session Manager's
//! routes, decoded into the same requests the gRPC services take.

pub mod handler;
pub mod json;
pub mod openapi;
pub mod routes;
pub mod sse;

pub use handler::RestLayer;
pub use routes::{ROUTES, RequestBody, Route, WATCH_ROUTES};
