//! The DCV wire adapter: the one place where DCV Session Manager's JSON
//! differs from proto3's JSON mapping, both ways. Everything else comes
//! from the contract's descriptors (`crate::pb::descriptor_pool`) through
//! prost-reflect: field names are the `json_name`s (`RequestId`,
//! `SuccessfulList`), enums are their value names, and the decoded JSON
//! becomes the very prost message the gRPC service takes.
//!
//! Requests:
//! - batch routes carry a bare JSON array whose items become the request's
//!   repeated field (`[{"ServerId": "a"}]` is `{"Servers": [...]}`);
//! - before any message is built, one streaming pass over the body counts
//!   list items at every depth against the gRPC codec's own bound
//!   ([`MAX_REQUEST_LIST_ITEMS`]): a megabyte array of `{}` costs a scan,
//!   not a million messages;
//! - unknown fields, wrong types and malformed JSON are
//!   `FleetError::InvalidArgument` naming the field (`Servers[0].Force`),
//!   so they reach the client through the same error mapping as the
//!   domain's own violations;
//! - `null` is "absent"; 64-bit integers may be numbers or strings.
//!
//! Replies (where proto3 JSON would differ from what DCV's clients read):
//! - every repeated field is present, `[]` when empty;
//! - every singular scalar is present with its value, defaults included;
//! - 64-bit integers are JSON numbers, as DCV's `int64` fields;
//! - an enum at its zero value (`*_UNSPECIFIED`), an unset message and an
//!   unset `optional` scalar are omitted: never `null`;
//! - well-known types (`Timestamp`, `Duration`) keep proto3's JSON (RFC
//!   3339 strings), bytes are standard base64.

use std::fmt;

use base64::Engine as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions, Value,
};
use serde::{
    Serialize, Serializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
    ser::{SerializeMap as _, SerializeSeq as _},
};

use super::routes::{RequestBody, Route};
use crate::{api::codec::MAX_REQUEST_LIST_ITEMS, fleet::FleetError};

/// The field a violation about the body as a whole names.
pub const BODY: &str = "body";

/// The request and reply descriptors of `route`'s gRPC method.
pub fn method_types(route: &Route) -> Option<(MessageDescriptor, MessageDescriptor)> {
    let (service, method) = route.grpc_path.strip_prefix('/')?.split_once('/')?;
    let method = crate::pb::descriptor_pool()
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    Some((method.input(), method.output()))
}

/// The most query parameters a request may carry: a batch route takes
/// three at most; a query of thousands is refused before any is looked at.
pub const MAX_QUERY_PARAMETERS: usize = 16;

/// Sets the fields `query` names (see [`query_fields`](super::routes::query_fields)) on `message`:
/// percent-decoded, each by its field's type. An unknown parameter, one
/// given twice, or a value of the wrong type is INVALID_ARGUMENT naming
/// the parameter.
fn apply_query(
    route: &Route,
    input: &MessageDescriptor,
    message: &mut DynamicMessage,
    query: &str,
) -> Result<(), FleetError> {
    let fields = super::routes::query_fields(route, input);
    let takes = if fields.is_empty() {
        "this route takes no query parameters".to_owned()
    } else {
        let names: Vec<&str> = fields.iter().map(|f| f.json_name()).collect();
        format!("this route takes {}", names.join(", "))
    };
    let mut violations = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, (name, value)) in form_urlencoded::parse(query.as_bytes()).enumerate() {
        if i == MAX_QUERY_PARAMETERS {
            violations.push(crate::fleet::FieldViolation::new(
                "query",
                format!("more than {MAX_QUERY_PARAMETERS} query parameters"),
            ));
            break;
        }
        let Some(field) = fields.iter().find(|f| f.json_name() == name) else {
            violations.push(crate::fleet::FieldViolation::new(
                name.into_owned(),
                format!("unknown query parameter; {takes}"),
            ));
            continue;
        };
        if seen.contains(&field.json_name()) {
            violations.push(crate::fleet::FieldViolation::new(
                name.into_owned(),
                "given more than once",
            ));
            continue;
        }
        seen.push(field.json_name());
        match query_value(field, &value) {
            Ok(value) => message.set_field(field, value),
            Err(why) => violations.push(crate::fleet::FieldViolation::new(name.into_owned(), why)),
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(FleetError::InvalidArgument(violations))
    }
}

/// A query parameter's text as `field`'s value.
fn query_value(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
        text.parse()
            .map_err(|_| format!("must be {what}, not {text:?}"))
    }
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => Value::Bool(match text {
            "true" => true,
            "false" => false,
            _ => return Err(format!("must be true or false, not {text:?}")),
        }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(number(text, "an integer")?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(number(text, "an integer")?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(number(text, "a non-negative integer")?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(number(text, "a non-negative integer")?),
        Kind::Enum(e) => match e.get_value_by_name(text) {
            Some(v) if v.number() != 0 => Value::EnumNumber(v.number()),
            _ => return Err(format!("must be one of {}", enum_names(&e))),
        },
        _ => return Err("is not a query parameter".into()),
    })
}

fn enum_names(e: &prost_reflect::EnumDescriptor) -> String {
    e.values()
        .filter(|v| v.number() != 0)
        .map(|v| v.name().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes `route`'s request from its body (batch and describe routes) or
/// its percent-decoded path parameters, and its query (see
/// [`query_fields`](super::routes::query_fields)), into the gRPC service's request message `M`.
pub fn decode_request<M: prost::Message + Default>(
    route: &Route,
    body: &[u8],
    params: &[String],
    query: Option<&str>,
) -> Result<M, FleetError> {
    let (input, _) = method_types(route).ok_or_else(|| {
        FleetError::Internal(format!("route {} names no contract method", route.path))
    })?;
    let message = match route.body {
        RequestBody::BareArray { field } => decode_array(&input, field, body)?,
        RequestBody::OptionalObject => decode_object(&input, body)?,
        RequestBody::PathParams { fields } => {
            let mut message = DynamicMessage::new(input.clone());
            for (name, value) in fields.iter().zip(params) {
                let field = input.get_field_by_name(name).ok_or_else(|| {
                    FleetError::Internal(format!("{} has no field {name}", input.full_name()))
                })?;
                message.set_field(&field, Value::String(value.clone()));
            }
            message
        }
    };
    let mut message = message;
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        apply_query(route, &input, &mut message, query)?;
    }
    message
        .transcode_to::<M>()
        .map_err(|e| FleetError::invalid(BODY, format!("does not fit the request message: {e}")))
}

/// The JSON of a reply message, by DCV's rules (see the module
/// documentation); with `additions`, dcv-broker's fields beyond DCV's too.
pub fn encode_reply<M: prost::Message>(
    output: &MessageDescriptor,
    reply: &M,
    additions: bool,
) -> Result<Vec<u8>, FleetError> {
    let bytes = reply.encode_to_vec();
    let message = DynamicMessage::decode(output.clone(), bytes.as_slice())
        .map_err(|e| FleetError::Internal(format!("reply does not decode as itself: {e}")))?;
    serde_json::to_vec(&Reply(&message, additions))
        .map_err(|e| FleetError::Internal(format!("reply does not serialize: {e}")))
}

fn decode_array(
    input: &MessageDescriptor,
    field_name: &str,
    body: &[u8],
) -> Result<DynamicMessage, FleetError> {
    let field = input.get_field_by_name(field_name).ok_or_else(|| {
        FleetError::Internal(format!("{} has no field {field_name}", input.full_name()))
    })?;
    let Kind::Message(item) = field.kind() else {
        return Err(FleetError::Internal(format!(
            "{field_name} is not a list of messages"
        )));
    };
    let expected = format!("a JSON array of {} objects", item.name());
    count(body, Top::Array(&expected))?;
    let items = with_path(field.json_name(), body, Items(item))?;
    let mut message = DynamicMessage::new(input.clone());
    message.set_field(&field, Value::List(items));
    Ok(message)
}

fn decode_object(input: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, FleetError> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(DynamicMessage::new(input.clone()));
    }
    let expected = format!("a JSON object ({})", input.name());
    count(body, Top::Object(&expected))?;
    with_path("", body, Message(input.clone()))
}

/// Runs `seed` over `body`, naming the failing field by its path (under
/// `prefix`, the request field a bare array fills).
fn with_path<'de, T>(prefix: &str, body: &'de [u8], seed: T) -> Result<T::Value, FleetError>
where
    T: DeserializeSeed<'de>,
{
    let mut json = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let value = seed.deserialize(serde_path_to_error::Deserializer::new(
        &mut json, &mut track,
    ));
    match value.and_then(|value| json.end().map(|()| value)) {
        Ok(value) => Ok(value),
        Err(e) => {
            let mut path = track.path().to_string();
            // prost-reflect names an unknown field in its message only; the
            // path stops at the object holding it.
            let unknown = unknown_field(&e);
            if let Some(name) = &unknown {
                path = match path.as_str() {
                    "." => name.to_owned(),
                    _ => format!("{path}.{name}"),
                };
            }
            let field = match (prefix, path.as_str()) {
                ("", ".") => BODY.to_owned(),
                ("", path) => path.to_owned(),
                (prefix, ".") => prefix.to_owned(),
                (prefix, path) if path.starts_with('[') => format!("{prefix}{path}"),
                (prefix, path) => format!("{prefix}.{path}"),
            };
            let description = match unknown {
                Some(name) => format!("unknown field {name:?}: the request has no such field"),
                None => describe(&e),
            };
            Err(FleetError::invalid(field, description))
        }
    }
}

/// The name prost-reflect's "unknown field" error gives.
fn unknown_field(e: &serde_json::Error) -> Option<String> {
    const MARK: &str = "unrecognized field name '";
    let text = e.to_string();
    let start = text.find(MARK)? + MARK.len();
    let end = text[start..].find('\'')? + start;
    Some(text[start..end].to_owned())
}

/// A JSON error as a sentence a client can act on.
fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => format!("malformed JSON: {e}"),
        Category::Io | Category::Data => e.to_string(),
    }
}

/// What the body's top level must be.
#[derive(Clone, Copy)]
enum Top<'a> {
    Array(&'a str),
    Object(&'a str),
}

/// The streaming pass: the body is well-formed JSON of the right shape
/// holding at most [`MAX_REQUEST_LIST_ITEMS`] list items at every depth.
/// Nothing is kept; nesting is bounded by serde_json's recursion limit.
fn count(body: &[u8], top: Top<'_>) -> Result<(), FleetError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let mut left = MAX_REQUEST_LIST_ITEMS;
    let result = de::Deserializer::deserialize_any(
        &mut json,
        Counter {
            left: &mut left,
            top: Some(top),
            item: false,
        },
    )
    .and_then(|()| json.end());
    result.map_err(|e| FleetError::invalid(BODY, describe(&e)))
}

/// Counts list items as it walks any JSON value; `top` is the shape the
/// outermost value must have.
struct Counter<'a, 'b> {
    left: &'a mut usize,
    top: Option<Top<'b>>,
    /// A list item: it takes one from `left` (only once it is known to
    /// exist, so that a list of exactly the bound passes).
    item: bool,
}

impl<'de> DeserializeSeed<'de> for Counter<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.item {
            *self.left = self.left.checked_sub(1).ok_or_else(|| {
                de::Error::custom(format!(
                    "the request holds more than {MAX_REQUEST_LIST_ITEMS} list items in all; \
                     send fewer"
                ))
            })?;
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.top {
            Some(Top::Array(expected) | Top::Object(expected)) => f.write_str(expected),
            None => f.write_str("any JSON value"),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if matches!(self.top, Some(Top::Object(_))) {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        while seq
            .next_element_seed(Counter {
                left: &mut *self.left,
                top: None,
                item: true,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if matches!(self.top, Some(Top::Array(_))) {
            return Err(de::Error::invalid_type(de::Unexpected::Map, &self));
        }
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Counter {
                left: &mut *self.left,
                top: None,
                item: false,
            })?;
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(de::Unexpected::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(de::Unexpected::Signed(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(de::Unexpected::Unsigned(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(de::Unexpected::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(de::Unexpected::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(de::Unexpected::Unit)
    }
}

impl Counter<'_, '_> {
    fn scalar<E: de::Error>(self, unexpected: de::Unexpected<'_>) -> Result<(), E> {
        match self.top {
            Some(_) => Err(E::invalid_type(unexpected, &self)),
            None => Ok(()),
        }
    }
}

/// Prost-reflect's proto3 JSON reading, unknown fields refused.
fn options() -> DeserializeOptions {
    DeserializeOptions::new().deny_unknown_fields(true)
}

/// One request message.
struct Message(MessageDescriptor);

impl<'de> DeserializeSeed<'de> for Message {
    type Value = DynamicMessage;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<DynamicMessage, D::Error> {
        DynamicMessage::deserialize_with_options(self.0, d, &options())
    }
}

/// A bare array of request items.
struct Items(MessageDescriptor);

impl<'de> DeserializeSeed<'de> for Items {
    type Value = Vec<Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<Value>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Items {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON array of {} objects", self.0.name())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        // The counting pass bounded the length already.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(Message(self.0.clone()))? {
            items.push(Value::Message(item));
        }
        Ok(items)
    }
}

/// A reply message, serialized by DCV's rules; the flag: with our fields
/// beyond DCV's.
struct Reply<'a>(&'a DynamicMessage, bool);

/// Whether `field` is one of dcv-broker's additions to DCV's API: the
/// contract marks each with a comment that starts "Beyond DCV" (the
/// OpenAPI names test checks that every field DCV lacks is so marked).
/// Clients generated from DCV's OpenAPI file by openapi-generator's Java
/// defaults (Amazon's Access Console among them) refuse a reply with any
/// field their file does not name, so REST replies leave these out unless
/// the broker is told otherwise (`--rest-additions`).
pub fn is_addition(field: &FieldDescriptor) -> bool {
    static ADDITIONS: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    ADDITIONS
        .get_or_init(|| {
            crate::pb::descriptor_pool()
                .all_messages()
                .flat_map(|message| message.fields().collect::<Vec<_>>())
                .filter(|field| {
                    super::openapi::field_comment(field)
                        .is_some_and(|c| c.starts_with("Beyond DCV"))
                })
                .map(|field| field.full_name().to_owned())
                .collect()
        })
        .contains(field.full_name())
}

/// Well-known types keep proto3's JSON form (a `Timestamp` is an RFC 3339
/// string).
fn is_well_known(message: &MessageDescriptor) -> bool {
    message.package_name() == "google.protobuf"
}

impl Serialize for Reply<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (message, additions) = (self.0, self.1);
        let descriptor = message.descriptor();
        if is_well_known(&descriptor) {
            return message.serialize_with_options(serializer, &SerializeOptions::new());
        }
        let mut map = serializer.serialize_map(None)?;
        for field in descriptor.fields() {
            if !additions && is_addition(&field) {
                continue;
            }
            let value = message.get_field(&field);
            if field.is_list() || field.is_map() {
                map.serialize_entry(
                    field.json_name(),
                    &Field {
                        field: &field,
                        value: &value,
                        additions,
                    },
                )?;
                continue;
            }
            if field.supports_presence() && !message.has_field(&field) {
                continue;
            }
            if matches!(*value, Value::EnumNumber(0)) {
                continue;
            }
            map.serialize_entry(
                field.json_name(),
                &Field {
                    field: &field,
                    value: &value,
                    additions,
                },
            )?;
        }
        map.end()
    }
}

/// One field's value (a whole list or map, or a single value).
struct Field<'a> {
    field: &'a FieldDescriptor,
    value: &'a Value,
    additions: bool,
}

impl Serialize for Field<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let kind = self.field.kind();
        match self.value {
            Value::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Single {
                        kind: &kind,
                        value: item,
                        additions: self.additions,
                    })?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let value_kind = match &kind {
                    Kind::Message(entry) => entry.map_entry_value_field().kind(),
                    _ => kind.clone(),
                };
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    let key = match key {
                        prost_reflect::MapKey::Bool(b) => b.to_string(),
                        prost_reflect::MapKey::I32(n) => n.to_string(),
                        prost_reflect::MapKey::I64(n) => n.to_string(),
                        prost_reflect::MapKey::U32(n) => n.to_string(),
                        prost_reflect::MapKey::U64(n) => n.to_string(),
                        prost_reflect::MapKey::String(s) => s.clone(),
                    };
                    map.serialize_entry(
                        &key,
                        &Single {
                            kind: &value_kind,
                            value,
                            additions: self.additions,
                        },
                    )?;
                }
                map.end()
            }
            value => Single {
                kind: &kind,
                value,
                additions: self.additions,
            }
            .serialize(serializer),
        }
    }
}

/// One value of kind `kind`.
struct Single<'a> {
    kind: &'a Kind,
    value: &'a Value,
    additions: bool,
}

impl Serialize for Single<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::I32(n) => serializer.serialize_i32(*n),
            // DCV's int64 fields are JSON numbers, not proto3's strings.
            Value::I64(n) => serializer.serialize_i64(*n),
            Value::U32(n) => serializer.serialize_u32(*n),
            Value::U64(n) => serializer.serialize_u64(*n),
            Value::F32(n) => float(serializer, f64::from(*n)),
            Value::F64(n) => float(serializer, *n),
            Value::String(s) => serializer.serialize_str(s),
            Value::Bytes(b) => {
                serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::EnumNumber(n) => match self.kind {
                Kind::Enum(e) => match e.get_value(*n) {
                    Some(v) => serializer.serialize_str(v.name()),
                    None => serializer.serialize_i32(*n),
                },
                _ => serializer.serialize_i32(*n),
            },
            Value::Message(m) => Reply(m, self.additions).serialize(serializer),
            // Lists and maps are whole fields, never single values.
            Value::List(_) | Value::Map(_) => serializer.serialize_seq(Some(0))?.end(),
        }
    }
}

/// A float as proto3 JSON writes it: a number, or `"NaN"`, `"Infinity"`,
/// `"-Infinity"` (JSON has no such numbers).
fn float<S: Serializer>(serializer: S, n: f64) -> Result<S::Ok, S::Error> {
    if n.is_nan() {
        serializer.serialize_str("NaN")
    } else if n.is_infinite() {
        serializer.serialize_str(if n > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        serializer.serialize_f64(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additions_are_the_fields_the_contract_marks_beyond_dcv() {
        let pool = crate::pb::descriptor_pool();
        let field = |message: &str, name: &str| {
            pool.get_message_by_name(&format!("dcv.sessionmanager.v1.{message}"))
                .unwrap()
                .get_field_by_name(name)
                .unwrap()
        };
        for (message, name) in [
            ("Server", "holds"),
            ("Server", "unavailability_reasons"),
            ("CloseServerRequestData", "reason"),
            ("DeleteSessionUnsuccessfulResponse", "failure_code"),
            ("GetSessionConnectionDataResponse", "request_id"),
        ] {
            assert!(is_addition(&field(message, name)), "{message}.{name}");
        }
        for (message, name) in [
            ("Server", "id"),
            ("Server", "unavailability_reason"),
            ("CloseServerUnsuccessfulResponse", "failure_code"),
            ("CloseServersResponse", "request_id"),
        ] {
            assert!(!is_addition(&field(message, name)), "{message}.{name}");
        }
    }
    use crate::{api::rest::ROUTES, pb};

    fn route(path: &str) -> &'static Route {
        ROUTES.iter().find(|r| r.path == path).unwrap()
    }

    fn violation(e: FleetError) -> (String, String) {
        match e {
            FleetError::InvalidArgument(v) => (v[0].field.clone(), v[0].description.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bare_array_fills_the_requests_list() {
        let request: pb::CloseServersRequest = decode_request(
            route("/closeServers"),
            br#"[{"ServerId": "a", "Force": true, "Reason": null}, {"server_id": "b"}]"#,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(request.servers.len(), 2);
        assert_eq!(request.servers[0].server_id, "a");
        assert_eq!(request.servers[0].force, Some(true));
        assert_eq!(request.servers[1].server_id, "b");
        assert_eq!(request.servers[1].force, None);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let close = route("/closeServers");
        let bad = |body: &str| {
            violation(
                decode_request::<pb::CloseServersRequest>(close, body.as_bytes(), &[], None)
                    .unwrap_err(),
            )
        };
        let (field, why) = bad(r#"[{"ServerId": "a"}, {"Bogus": 1}]"#);
        assert_eq!(field, "Servers[1].Bogus");
        assert!(why.contains("Bogus"), "{why}");
        let (field, why) = bad(r#"[{"ServerId": 7}]"#);
        assert_eq!(field, "Servers[0].ServerId");
        assert!(why.contains("invalid type"), "{why}");
        let (field, why) = bad(r#"{"ServerId": "a"}"#);
        assert_eq!(field, BODY);
        assert!(
            why.contains("JSON array of CloseServerRequestData"),
            "{why}"
        );
        let (field, why) = bad(r#"[{"ServerId": "a"}"#);
        assert_eq!(field, BODY);
        assert!(why.starts_with("malformed JSON"), "{why}");
        let (field, _) = bad(&format!("{}{}", "[".repeat(200), "]".repeat(200)));
        assert_eq!(field, BODY);
        let (_, why) = bad(&format!("[{}{{}}]", "{},".repeat(MAX_REQUEST_LIST_ITEMS)));
        assert!(why.contains("list items"), "{why}");
        // Just at the bound is fine.
        let ok: pb::CloseServersRequest = decode_request(
            close,
            format!("[{}{{}}]", "{},".repeat(MAX_REQUEST_LIST_ITEMS - 1)).as_bytes(),
            &[],
            None,
        )
        .unwrap();
        assert_eq!(ok.servers.len(), MAX_REQUEST_LIST_ITEMS);
    }

    #[test]
    fn describes_take_no_body_or_an_object() {
        let describe = route("/describeServers");
        for body in ["", "  ", "{}", "null"] {
            let r: pb::DescribeServersRequest =
                decode_request(describe, body.as_bytes(), &[], None).unwrap();
            assert_eq!(r, pb::DescribeServersRequest::default(), "{body:?}");
        }
        let r: pb::DescribeServersRequest = decode_request(
            describe,
            br#"{"ServerIds": ["a"], "MaxResults": "5"}"#,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(r.server_ids, ["a"]);
        assert_eq!(r.max_results, Some(5));
        let e =
            decode_request::<pb::DescribeServersRequest>(describe, b"[]", &[], None).unwrap_err();
        assert_eq!(violation(e).0, BODY);
        let e =
            decode_request::<pb::DescribeServersRequest>(describe, br#"{"Nope": 1}"#, &[], None)
                .unwrap_err();
        assert_eq!(violation(e).0, "Nope");
    }

    #[test]
    fn replies_follow_dcvs_rules() {
        let (_, output) = method_types(route("/closeServers")).unwrap();
        let reply = pb::CloseServersResponse {
            request_id: "r".into(),
            successful_list: vec![],
            unsuccessful_list: vec![pb::CloseServerUnsuccessfulResponse {
                close_server_request_data: Some(pb::CloseServerRequestData {
                    server_id: "x".into(),
                    force: None,
                    reason: String::new(),
                    ..Default::default()
                }),
                failure_code: pb::FailureCode::DcvServerNotFound as i32,
                failure_reason: "Dcv server not found.".into(),
            }],
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode_reply(&output, &reply, true).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "RequestId": "r",
                "SuccessfulList": [],
                "UnsuccessfulList": [{
                    "CloseServerRequestData": {"ServerId": "x", "Reason": ""},
                    "FailureCode": "DCV_SERVER_NOT_FOUND",
                    "FailureReason": "Dcv server not found.",
                }],
            })
        );
    }

    #[test]
    fn int64_are_numbers_and_timestamps_strings() {
        let pool = crate::pb::descriptor_pool();
        let storage = pool
            .all_messages()
            .find(|m| m.get_field_by_json_name("TotalBytes").is_some())
            .unwrap();
        let mut message = DynamicMessage::new(storage.clone());
        message.set_field_by_name("total_bytes", Value::I64(1 << 40));
        let json = serde_json::to_value(Reply(&message, true)).unwrap();
        assert_eq!(json["TotalBytes"], serde_json::json!(1u64 << 40));
        assert_eq!(json["UsedBytes"], serde_json::json!(0));

        let (_, output) = method_types(route("/describeSessions")).unwrap();
        let reply = pb::DescribeSessionsResponse {
            sessions: vec![pb::Session {
                creation_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode_reply(&output, &reply, true).unwrap()).unwrap();
        let session = &json["Sessions"][0];
        assert_eq!(session["CreationTime"], "1970-01-01T00:00:00Z");
        assert!(session.get("LastDisconnectionTime").is_none());
        assert!(session.get("State").is_none(), "zero enums are omitted");
        assert_eq!(json["NextToken"], "");
    }
}
