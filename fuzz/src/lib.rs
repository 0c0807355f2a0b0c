//! The harness behind dcv-broker's fuzz targets (`fuzz_targets/`), kept in
//! a library so that the targets stay one line each and the seed writer
//! (`examples/write_seeds.rs`) builds its inputs with the same code.
//!
//! - [`rpc`]: every request message of every RPC, and the input format
//!   of the `requests` target (a selector byte, then the encoded message).
//! - [`fixture`]: the live in-process fleet the requests are driven
//!   against, built through the real handlers.
//! - [`requests`]: decodes an input, calls the real tonic handler and
//!   checks the reply's invariants.
//! - [`requirements`]: the Requirements parser's round trip and
//!   evaluation on arbitrary text.
//! - [`seeds`]: small, meaningful inputs for the committed corpus.
//! - [`budget`]: what one request may cost (lock hold, allocation), and
//!   the counting allocator that measures it.

pub mod budget;
pub mod fixture;
pub mod requests;
pub mod requirements;
pub mod rpc;
pub mod seeds;

/// Every fuzz binary counts its allocations (see [`budget`]).
#[global_allocator]
static ALLOCATOR: budget::Counting = budget::Counting;
