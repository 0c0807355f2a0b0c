//! The fleet: every DCV server the broker knows, behind one cloneable
//! handle.
//!
//! State lives in a `HashMap` (lookups by id) plus an ordered index of ids
//! (stable pagination) and an index of ids by load (placement without a
//! scan of the fleet), all inside one `parking_lot::RwLock`. The lock is a
//! synchronous one on purpose: every critical section is short, CPU-only and
//! never spans an `.await`, so an async lock would only add cost. A batch is
//! validated before the lock is taken and applied inside one write section,
//! so nobody ever observes half of it (CreateSessions excepted: it places
//! its items in several short sections, see `Fleet::create_sessions`).
//! Every write section is timed ([`Fleet::take_longest_write_hold`]).
//!
//! Time is tokio's clock (`tokio::time::Instant`), so tests can pause and
//! advance it. Heartbeat expiry needs no timer: availability is derived from
//! the age of the last heartbeat when asked, and servers past the removal
//! timeout are swept by whichever operation first notices they are due (and
//! by a periodic sweeper the server runs), so removal is exact whether or
//! not anything is running in the background.
//!
//! One file per concern: `handle.rs` holds the [`Fleet`] handle and its
//! lock discipline, `state.rs` the state behind the lock, `servers.rs` and
//! `agents.rs` the operators' and the agents' operations on servers,
//! [`sessions`] everything about sessions, `validate.rs` the stateless
//! checks, `replica.rs` what a replica of several brokers on one database
//! does instead (applying the leader's changes, reloading on a change of
//! role). This file only maps the modules and re-exports the public
//! paths, so that no module needs to import it.

mod agents;
pub mod availability;
pub mod blast;
pub mod client_tokens;
mod config;
mod connection_token;
mod drain_index;
pub mod drains;
pub mod error;
mod gauges;
mod handle;
pub mod history;
mod hold_state;
pub mod holds;
mod intern;
mod load_index;
pub mod model;
pub mod page_token;
pub mod persist;
pub mod query;
mod replica;
pub mod requirements;
mod servers;
pub mod sessions;
mod state;
mod validate;
pub mod watch;
pub mod watch_sessions;

pub use self::{
    availability::{Reason, Reasons},
    blast::{AffectedServer, AffectedSession, BlastRadius, PoolCapacity},
    client_tokens::{Claim, TokenKey, TokenTicket},
    config::FleetConfig,
    drains::{
        DrainDeadline, DrainOutcome, DrainPage, DrainQuery, DrainRequest, DrainState, DrainView,
    },
    error::{AgentStep, FailureCode, FieldViolation, FleetError, ItemFailure, ItemResult},
    gauges::{FleetGauges, SESSION_STATES},
    handle::Fleet,
    history::{HistoryPage, HistoryQuery, HistoryRecord},
    holds::{CapacityFloor, Expiry},
    model::*,
    query::DescribeQuery,
    servers::{CloseItem, OpenItem, ServerView},
    sessions::{
        DeleteItem, FleetEvent, Instruction, InstructionId, InstructionKind, InstructionOutcome,
        Order, PermissionsItem, PlacementStrategy, SequencedEvent, SessionId, SessionQuery,
        SessionRecord, SessionView,
        screenshots::{ScreenshotItem, ScreenshotResult},
    },
    state::PlacementCounts,
    validate::{
        MAX_AGENT_REASON_CHARS, MAX_BATCH_ITEMS, MAX_ENDPOINTS, MAX_GPUS, MAX_LOGGED_IN_USERS,
        MAX_REPORTED_SESSIONS, MAX_SESSION_CONNECTIONS, MAX_TAGS, MAX_TEXT_BYTES, agent_text,
        check_lengths, validate_batch_size, validate_batch_size_up_to, validate_server_id,
    },
};
