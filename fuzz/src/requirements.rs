//! The `requirements` target: the placement Requirements parser on
//! arbitrary text. What must hold of any input:
//!
//! - bytes that are not UTF-8 never reach the parser: as a CreateSessions
//!   item's `Requirements` field, prost refuses them (a proto3 `string`);
//! - an error points inside the input (a character offset no further than
//!   its end) and says something;
//! - an accepted expression's canonical form is within the length limit,
//!   parses back to the same expression and prints the same again;
//! - it evaluates, without panicking, against every server of the fuzz
//!   fixture (Linux and Windows, with and without AWS, tags and load).
//!
//! A panic is a crash.

use std::sync::LazyLock;

use dcv_broker::{
    fleet::{
        DescribeQuery, ServerRecord,
        requirements::{MAX_EXPRESSION_CHARS, Requirements},
    },
    pb,
};
use prost::Message;

use crate::fixture::Broker;

/// The fixture's servers, built once.
static SERVERS: LazyLock<Vec<ServerRecord>> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let broker = runtime.block_on(Broker::build());
    let mut servers = Vec::new();
    broker
        .fleet
        .describe_servers(&DescribeQuery::default(), |view| {
            servers.push(view.record.clone());
        })
        .expect("describe the fixture");
    servers
});

/// Runs one input of the `requirements` target.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(
            pb::CreateSessionRequestData::decode(requirements_field(data).as_slice()).is_err(),
            "prost accepted a non-UTF-8 Requirements"
        );
        return;
    };
    match Requirements::parse(text) {
        Ok(parsed) => {
            let canonical = parsed.to_string();
            assert!(
                canonical.chars().count() <= MAX_EXPRESSION_CHARS,
                "a canonical form over the limit"
            );
            let reparsed = Requirements::parse(&canonical)
                .unwrap_or_else(|e| panic!("{canonical:?} does not parse back: {e}"));
            assert_eq!(reparsed, parsed, "{text:?} does not round trip");
            assert_eq!(reparsed.to_string(), canonical);
            for server in SERVERS.iter() {
                let _ = parsed.matches(server);
            }
        }
        Err(e) => {
            assert!(
                e.position <= text.chars().count(),
                "{e} for {text:?}: past the end"
            );
            assert!(!e.message.is_empty(), "an empty message for {text:?}");
        }
    }
}

/// `value` as field 12 (`Requirements`) of a CreateSessionRequestData,
/// encoded by hand (prost will not encode a non-UTF-8 string).
fn requirements_field(value: &[u8]) -> Vec<u8> {
    let mut out = vec![12 << 3 | 2];
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}
