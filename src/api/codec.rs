//! The broker's protobuf codec: prost's, after a scan of each request's
//! wire bytes that refuses one holding too many list items before anything
//! is decoded.
//!
//! Protobuf encodes an empty list item in two bytes, while decoded it takes
//! a struct of up to a few hundred (a `CreateSessionRequestData` is about
//! 250): an 8 MiB request of empty items would make prost allocate a
//! gigabyte before any handler could look at its length. The scan walks the
//! message as the contract describes it (which fields are lists, which are
//! nested messages) without allocating, and counts list items at every
//! depth against [`MAX_REQUEST_LIST_ITEMS`]. Responses, which the broker
//! builds itself, and the clients' decoding are not scanned.

use std::{collections::HashMap, marker::PhantomData, sync::OnceLock};

use prost::{
    Message, Name,
    bytes::Buf,
    encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field},
};
use prost_reflect::{DescriptorPool, Kind};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::fleet::FleetError;

/// The most list items (elements of repeated fields, at any depth) one
/// request may hold in all (default 65,536). The largest valid requests
/// hold fewer: a batch of 1,000 sessions with 50 autorun arguments each
/// holds 51,000, a heartbeat at most 11,024. At a few hundred bytes per
/// decoded item, this bounds what decoding a request allocates for its
/// lists to about 16 MiB, whatever its size on the wire.
pub const MAX_REQUEST_LIST_ITEMS: usize = 65_536;

/// Nesting deeper than prost's own limit is left to prost to refuse.
const MAX_DEPTH: u32 = 100;

/// Fields are looked up by number in a dense table (the scan runs on every
/// request, once per field on the wire: an index is a few times cheaper
/// than a hash look-up). The contract's numbers are small; a field numbered
/// above this is not scanned (prost then decodes it as usual).
const MAX_FIELD_NUMBER: u32 = 1024;

/// How a scalar list item is encoded, to count the items of a packed list.
#[derive(Debug, Clone, Copy)]
enum Width {
    Varint,
    Fixed32,
    Fixed64,
}

/// What one field's items are.
#[derive(Debug, Clone, Copy)]
enum Element {
    Scalar(Width),
    /// Strings and bytes.
    Bytes,
    /// A message: its index in [`Schema::messages`].
    Message(usize),
}

#[derive(Debug)]
struct Field {
    /// The name clients know (DCV's JSON names), for the violation.
    json_name: Box<str>,
    list: bool,
    element: Element,
}

/// The contract's messages, as much of them as the scan needs.
#[derive(Debug, Default)]
struct Schema {
    /// Each message's fields, indexed by number.
    messages: Vec<Box<[Option<Field>]>>,
    /// Whether a message can hold a list at any depth: one that cannot
    /// (a batch's items, mostly) is skipped whole instead of walked.
    holds_lists: Vec<bool>,
    /// The request messages of the services, by name (without package).
    requests: HashMap<String, Request>,
}

/// A request message of the contract.
#[derive(Debug)]
struct Request {
    package: String,
    /// Its index in [`Schema::messages`].
    message: usize,
}

impl Schema {
    fn from_descriptors(encoded: &[u8]) -> Result<Schema, prost_reflect::DescriptorError> {
        let pool = DescriptorPool::decode(encoded)?;
        let index: HashMap<String, usize> = pool
            .all_messages()
            .enumerate()
            .map(|(i, m)| (m.full_name().to_owned(), i))
            .collect();
        let messages: Vec<Box<[Option<Field>]>> = pool
            .all_messages()
            .map(|m| {
                let size = m
                    .fields()
                    .map(|f| f.number())
                    .filter(|&n| n <= MAX_FIELD_NUMBER)
                    .max()
                    .map_or(0, |n| n as usize + 1);
                let mut fields: Vec<Option<Field>> = (0..size).map(|_| None).collect();
                for f in m.fields() {
                    {
                        let element = match f.kind() {
                            Kind::Message(m) => index
                                .get(m.full_name())
                                .map_or(Element::Bytes, |&i| Element::Message(i)),
                            Kind::String | Kind::Bytes => Element::Bytes,
                            Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => {
                                Element::Scalar(Width::Fixed64)
                            }
                            Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => {
                                Element::Scalar(Width::Fixed32)
                            }
                            _ => Element::Scalar(Width::Varint),
                        };
                        let field = Field {
                            json_name: f.json_name().into(),
                            // A map is a list of entry messages on the wire.
                            list: f.is_list() || f.is_map(),
                            element,
                        };
                        if let Some(slot) = fields.get_mut(f.number() as usize) {
                            *slot = Some(field);
                        }
                    }
                }
                fields.into_boxed_slice()
            })
            .collect();
        let requests = pool
            .services()
            .flat_map(|s| s.methods().collect::<Vec<_>>())
            .filter_map(|m| {
                let input = m.input();
                let request = Request {
                    package: input.package_name().to_owned(),
                    message: *index.get(input.full_name())?,
                };
                Some((input.name().to_owned(), request))
            })
            .collect();
        let holds_lists = holds_lists(&messages);
        Ok(Schema {
            messages,
            holds_lists,
            requests,
        })
    }

    /// The contract's schema, built once.
    fn get() -> &'static Schema {
        static SCHEMA: OnceLock<Schema> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            Schema::from_descriptors(crate::pb::FILE_DESCRIPTOR_SET).unwrap_or_else(|e| {
                // The descriptors are compiled in; a test decodes them.
                tracing::error!(error = %e, "cannot read the contract's descriptors; requests are not scanned");
                Schema::default()
            })
        })
    }

    /// Counts the list items of message `message` in `buf` against
    /// `left`. On running out, the error is the path of the list that
    /// crossed the limit, innermost field first. Malformed bytes end the
    /// scan quietly: prost refuses them (and has allocated only for the
    /// items before them, which were counted).
    fn scan(
        &self,
        message: usize,
        mut buf: &[u8],
        left: &mut usize,
        depth: u32,
    ) -> Result<(), Vec<&str>> {
        let Some(fields) = self.messages.get(message) else {
            return Ok(());
        };
        if depth > MAX_DEPTH {
            return Ok(());
        }
        while buf.has_remaining() {
            let Ok((number, wire_type)) = decode_key(&mut buf) else {
                return Ok(());
            };
            let field = fields.get(number as usize).and_then(Option::as_ref);
            let payload = match wire_type {
                WireType::LengthDelimited => {
                    let Ok(len) = decode_varint(&mut buf) else {
                        return Ok(());
                    };
                    let Some(len) = usize::try_from(len).ok().filter(|&l| l <= buf.len()) else {
                        return Ok(());
                    };
                    let (payload, rest) = buf.split_at(len);
                    buf = rest;
                    Some(payload)
                }
                _ => {
                    if skip_field(wire_type, number, &mut buf, DecodeContext::default()).is_err() {
                        return Ok(());
                    }
                    None
                }
            };
            let Some(field) = field else {
                continue;
            };
            let items = match (field.element, payload) {
                (Element::Scalar(width), Some(packed)) if field.list => match width {
                    Width::Varint => packed.iter().filter(|&&b| b < 0x80).count(),
                    Width::Fixed32 => packed.len() / 4,
                    Width::Fixed64 => packed.len() / 8,
                },
                _ if field.list => 1,
                _ => 0,
            };
            match left.checked_sub(items) {
                Some(l) => *left = l,
                None => return Err(vec![&*field.json_name]),
            }
            if let (Element::Message(nested), Some(payload)) = (field.element, payload)
                && self.holds_lists.get(nested).copied().unwrap_or(true)
            {
                self.scan(nested, payload, left, depth + 1)
                    .map_err(|mut path| {
                        path.push(&*field.json_name);
                        path
                    })?;
            }
        }
        Ok(())
    }

    /// Refuses a request message `name` whose encoding `bytes` holds more
    /// than [`MAX_REQUEST_LIST_ITEMS`] list items.
    fn check(&self, package: &str, name: &str, bytes: &[u8]) -> Result<(), FleetError> {
        let Some(request) = self.requests.get(name).filter(|r| r.package == package) else {
            return Ok(());
        };
        let message = request.message;
        let mut left = MAX_REQUEST_LIST_ITEMS;
        self.scan(message, bytes, &mut left, 0).map_err(|mut path| {
            path.reverse();
            FleetError::invalid(
                path.join("."),
                format!(
                    "the request holds more than {MAX_REQUEST_LIST_ITEMS} list items in all; send fewer"
                ),
            )
        })
    }
}

/// Which messages can hold a list at any depth: those with a list field,
/// then, until nothing changes, those with a field of such a message
/// (recursive messages included).
fn holds_lists(messages: &[Box<[Option<Field>]>]) -> Vec<bool> {
    let mut holds: Vec<bool> = messages
        .iter()
        .map(|fields| fields.iter().flatten().any(|f| f.list))
        .collect();
    loop {
        let mut changed = false;
        for (i, fields) in messages.iter().enumerate() {
            if holds[i] {
                continue;
            }
            let nested = fields.iter().flatten().any(|f| match f.element {
                Element::Message(m) => holds.get(m).copied().unwrap_or(false),
                _ => false,
            });
            if nested {
                holds[i] = true;
                changed = true;
            }
        }
        if !changed {
            return holds;
        }
    }
}

/// Refuses the encoding `bytes` of request message `M` if it holds more
/// than [`MAX_REQUEST_LIST_ITEMS`] list items: what the codec does before
/// it decodes, for callers that decode requests themselves (the fuzzer).
pub fn check_request<M: Name>(bytes: &[u8]) -> Result<(), Status> {
    // By package and name: `M::full_name()` would build a String on every
    // request.
    Schema::get()
        .check(M::PACKAGE, M::NAME, bytes)
        .map_err(Status::from)
}

/// The codec of the broker's services (`build.rs` names it): prost's, with
/// requests scanned before they are decoded.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decodes `U` with prost once the scan has passed it.
#[derive(Debug)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Name + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // One message, whole and contiguous: tonic hands the decoder a
        // complete frame.
        check_request::<U>(buf.chunk())?;
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn check<M: Message + Name>(m: &M) -> Result<(), FleetError> {
        Schema::get().check(M::PACKAGE, M::NAME, &m.encode_to_vec())
    }

    fn crossed(result: Result<(), FleetError>) -> String {
        match result {
            Err(FleetError::InvalidArgument(v)) => v[0].field.clone(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_schema_knows_every_request() {
        let schema = Schema::get();
        for name in [
            "CloseServersRequest",
            "DescribeServersRequest",
            "CreateSessionsRequest",
            "HeartbeatRequest",
            "RegisterServerRequest",
            "ValidateConnectionTokenRequest",
            "GetSessionScreenshotsRequest",
            "ReportInstructionResultRequest",
        ] {
            let request = schema.requests.get(name).expect(name);
            assert_eq!(request.package, "dcv.sessionmanager.v1", "{name}");
        }
        assert!(
            !schema
                .requests
                .contains_key(pb::DescribeServersResponse::NAME)
        );
    }

    #[test]
    fn lists_at_the_limit_pass_and_one_more_item_anywhere_is_refused() {
        let users = |n| pb::HeartbeatRequest {
            server_id: "s".into(),
            logged_in_users: vec![pb::LoggedInUser::default(); n],
            sessions: vec![pb::AgentSession::default(); 1000],
            ..Default::default()
        };
        assert!(check(&users(MAX_REQUEST_LIST_ITEMS - 1000)).is_ok());
        assert_eq!(
            crossed(check(&users(MAX_REQUEST_LIST_ITEMS - 999))),
            "Sessions"
        );

        // Nested lists count too, and the path names them.
        let item = pb::CreateSessionRequestData {
            autorun_file_arguments: vec![String::new(); 100],
            ..Default::default()
        };
        let per_item = 1 + 100;
        let batch = |n| pb::CreateSessionsRequest {
            sessions: vec![item.clone(); n],
            ..Default::default()
        };
        let fits = MAX_REQUEST_LIST_ITEMS / per_item;
        assert!(check(&batch(fits)).is_ok());
        assert_eq!(
            crossed(check(&batch(fits + 1))),
            "Sessions.AutorunFileArguments"
        );
        let mut registration = pb::RegisterServerRequest {
            host: Some(pb::Host {
                gpus: vec![pb::Gpu::default(); MAX_REQUEST_LIST_ITEMS + 1],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(crossed(check(&registration)), "Host.Gpus");
        registration.host = None;
        assert!(check(&registration).is_ok());
    }

    #[test]
    fn screenshot_requests_and_reports_are_counted_too() {
        let batch = |n| pb::GetSessionScreenshotsRequest {
            sessions: vec![pb::GetSessionScreenshotRequestData::default(); n],
        };
        assert!(check(&batch(MAX_REQUEST_LIST_ITEMS)).is_ok());
        assert_eq!(
            crossed(check(&batch(MAX_REQUEST_LIST_ITEMS + 1))),
            "Sessions"
        );
        let report = |n| pb::ReportInstructionResultRequest {
            images: vec![pb::SessionScreenshotImage::default(); n],
            ..Default::default()
        };
        assert!(check(&report(MAX_REQUEST_LIST_ITEMS)).is_ok());
        assert_eq!(
            crossed(check(&report(MAX_REQUEST_LIST_ITEMS + 1))),
            "Images"
        );
    }

    #[test]
    fn packed_scalars_count_one_item_each() {
        // No request of the contract has a repeated scalar; a response
        // does, and its scan is the same code.
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let server = pool
            .all_messages()
            .position(|m| m.full_name() == pb::Server::full_name())
            .unwrap();
        let bytes = pb::Server {
            unavailability_reasons: vec![1; 10],
            ..Default::default()
        }
        .encode_to_vec();
        let mut left = 10;
        assert!(Schema::get().scan(server, &bytes, &mut left, 0).is_ok());
        assert_eq!(left, 0);
        let mut left = 9;
        assert_eq!(
            Schema::get().scan(server, &bytes, &mut left, 0),
            Err(vec!["UnavailabilityReasons"])
        );
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        // A length beyond the end, a truncated varint, a bare end-group.
        for bytes in [&[0x22, 0x7f][..], &[0x22, 0x80], &[0x0c]] {
            assert!(check_request::<pb::HeartbeatRequest>(bytes).is_ok());
            assert!(pb::HeartbeatRequest::decode(bytes).is_err());
        }
    }
}
