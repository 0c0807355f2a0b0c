//! Several brokers on one PostgreSQL database: which one leads, what each
//! replica has applied, and the store the fleet writes through while the
//! role changes under it.
//!
//! [`ClusterView`] is what the rest of the broker reads (the gRPC adapters
//! to know whether to forward a write, the health service, the store
//! writer to publish what it committed). A single broker (SQLite or in
//! memory) holds a [`ClusterView::standalone`] view: always the leader,
//! nothing to forward, nothing to wait for.

mod controller;
mod view;

pub use controller::{Controller, Replica};

pub use view::{ClusterStore, ClusterView, Role, Status};
