//! Our OpenAPI description of the REST facade, served at
//! `/dcv-session-manager-api.yaml` where DCV Session Manager serves its own.
//!
//! Nothing here is written by hand per operation or per field: the document
//! is generated from [`ROUTES`] (paths, methods, operationIds, how each
//! request is carried) and from the contract's protobuf descriptors (every
//! schema, field, type and description; the descriptor set keeps the proto
//! comments). It follows the DCV wire adapter's rules (rest-contract, "The
//! DCV wire adapter"): JSON names, 64-bit integers as JSON numbers, enums as
//! their value names without the `*_UNSPECIFIED` zero value, Timestamps as
//! RFC 3339 strings, bytes as base64 strings. A message DCV's own document
//! also describes carries DCV's schema name (see [`MESSAGE_SCHEMA_NAMES`]),
//! so that a client generated from either document has the same classes.
//!
//! The model is `utoipa`'s `openapi` types, not hand-built `serde_json`
//! values: they are the maintained Rust model of OpenAPI 3.1, type-check the
//! structure as it is built (a `$ref` where a `$ref` may go, a status code
//! map of responses), and deserialize back, which the tests use to check
//! the served bytes. We use the model only, no derive macros.
//!
//! The served format is YAML, as DCV serves it, rendered through utoipa's
//! `yaml` feature (`yaml_serde`, the YAML organisation's maintained
//! continuation of `serde_yaml`). Should rendering ever fail, the document
//! is served as JSON text, which is valid YAML 1.2, under the same content
//! type.
//!
//! utoipa writes OpenAPI 3.1 (DCV's file is 3.0): the schemas are JSON
//! Schema 2020-12, which validators and code generators read directly.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ServiceDescriptor,
};
use utoipa::openapi::path::{HttpMethod, Operation, Parameter, ParameterIn};
use utoipa::openapi::request_body::RequestBody as OpenApiRequestBody;
use utoipa::openapi::schema::{
    AdditionalProperties, Array, KnownFormat, Object, Ref, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::Tag;
use utoipa::openapi::{
    Components, Content, Header, Info, OpenApi, Paths, RefOr, Required, Response, Responses, Server,
};

use super::routes::{ROUTES, RequestBody, Route};

/// The content type of [`document`]'s bytes (RFC 9512).
pub const CONTENT_TYPE: &str = "application/yaml";

/// The security scheme every DCV route requires (DCV's name for it).
const SECURITY_SCHEME: &str = "bearerAuth";

/// The schema of every non-200 reply body (ours; DCV documents none).
const ERROR_SCHEMA: &str = "ErrorResponse";

/// Contract messages whose DCV schema has another name: proto full name,
/// DCV's schema name. Every other message keeps its proto name, which is
/// already DCV's where DCV has the message.
const MESSAGE_SCHEMA_NAMES: &[(&str, &str)] = &[
    (
        "dcv.sessionmanager.v1.DescribeSessionsRequest",
        "DescribeSessionsRequestData",
    ),
    (
        "dcv.sessionmanager.v1.DescribeServersRequest",
        "DescribeServersRequestData",
    ),
    (
        "dcv.sessionmanager.v1.CreateSessionUnsuccessfulResponse",
        "UnsuccessfulCreateSessionRequestData",
    ),
];

/// Fields whose message DCV describes under a name of the field's own:
/// one proto message (`MemoryInfo`) is two identical DCV schemas.
const FIELD_SCHEMA_NAMES: &[(&str, &str)] = &[
    ("dcv.sessionmanager.v1.Host.memory", "Memory"),
    ("dcv.sessionmanager.v1.Host.swap", "Swap"),
];

/// DCV's tag of an operation whose tag is not its gRPC service's name in
/// lower case. Generated clients make one API class per tag
/// (`SessionPermissionsApi`, ...), so the tags are DCV's.
const OPERATION_TAGS: &[(&str, &str)] = &[
    ("updateSessionPermissions", "sessionPermissions"),
    ("GetSessionConnectionData", "GetSessionConnectionData"),
];

/// A header that comes with an error status: its name and what it says.
type ErrorHeader = Option<(&'static str, &'static str)>;

/// The error statuses every route documents (rest-contract, "Errors"), with
/// what each means and the header that comes with it.
const ERROR_STATUSES: &[(u16, &str, ErrorHeader)] = &[
    (
        400,
        "Malformed request: bad JSON, a wrong type, an unknown field, or a \
         value the operation refuses (`invalid_request`); `field_violations` \
         names the fields when known.",
        None,
    ),
    (
        401,
        "Missing, malformed, expired or unverifiable bearer token \
         (`invalid_token`).",
        Some((
            "WWW-Authenticate",
            "The Bearer challenge of RFC 6750, with the error.",
        )),
    ),
    (
        403,
        "The token lacks the scope this operation needs (`insufficient_scope`).",
        None,
    ),
    (
        404,
        "Unknown route (`not_found`), or an unknown session or server where \
         the operation has no per-item list for it.",
        None,
    ),
    (
        405,
        "Known path, wrong method.",
        Some(("Allow", "The methods this path answers.")),
    ),
    (
        413,
        "Request body larger than the broker's request size limit \
         (`payload_too_large`).",
        None,
    ),
    (
        409,
        "A call with the same `ClientToken` is still running (`conflict`); \
         retry later to get its reply.",
        None,
    ),
    (415, "A request body that is not `application/json`.", None),
    (
        429,
        "Rate or in-flight limit reached (`too_many_requests`).",
        Some((
            "Retry-After",
            "Seconds to wait before retrying, when known.",
        )),
    ),
    (
        503,
        "The broker is shutting down or not ready, or holds as many \
         `ClientToken` records as it may (`unavailable`).",
        None,
    ),
];

/// The served document: built once, then the same bytes for every request.
pub fn document() -> &'static [u8] {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let openapi = build();
        match openapi.to_yaml() {
            Ok(yaml) => yaml.into_bytes(),
            // JSON is YAML 1.2, so the content type still holds.
            Err(_) => openapi.to_pretty_json().unwrap_or_default().into_bytes(),
        }
    })
}

/// Builds the document from [`ROUTES`] and the contract's descriptors.
pub fn build() -> OpenApi {
    let pool = crate::pb::descriptor_pool();
    let mut schemas = Schemas::default();
    let mut paths = Paths::new();
    let mut tags: Vec<Tag> = Vec::new();

    for route in ROUTES {
        let Some((service, method)) = grpc_method(pool, route) else {
            // A route the contract does not know cannot be described;
            // routes.rs's own test refuses such a route.
            continue;
        };
        let tag = tag_of(route, &service);
        if !tags.iter().any(|t| t.name == tag) {
            let mut t = Tag::new(tag.clone());
            t.description = comment_of(&service.parent_file(), service.path());
            tags.push(t);
        }
        let operation = route_operation(route, &method, tag, &mut schemas);
        paths.add_path_operation(route.path, vec![http_method(route)], operation);
    }
    paths.add_path_operation(
        "/health",
        vec![HttpMethod::Get],
        health_operation("getHealth"),
    );
    paths.add_path_operation(
        "/health",
        vec![HttpMethod::Head],
        health_operation("headHealth"),
    );
    let mut health_tag = Tag::new("health");
    health_tag.description = Some("Load balancers' health check.".into());
    tags.push(health_tag);

    let mut components = Components::new();
    components.schemas = schemas.finish();
    components
        .schemas
        .insert(ERROR_SCHEMA.into(), error_schema().into());
    components
        .schemas
        .insert("FieldViolation".into(), field_violation_schema().into());
    components
        .schemas
        .insert("HealthStatus".into(), health_schema().into());
    components.security_schemes.insert(
        SECURITY_SCHEME.into(),
        RefOr::T(SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer))),
    );

    let mut info = Info::new(
        "dcv-broker: DCV Session Manager REST API",
        env!("CARGO_PKG_VERSION"),
    );
    info.description = Some(
        "DCV Session Manager's REST operations as dcv-broker serves them, \
         generated from dcv-broker's routes and protobuf contract. Paths, \
         operationIds, schema and field names are DCV's; fields DCV does not \
         have are dcv-broker's additions and say so (\"Beyond DCV\"); replies \
         carry them only when the broker runs with `--rest-additions`. Every \
         list field is present (`[]` when empty) and every scalar field is \
         present with its value; an enum field at its unset value and an \
         unset object are omitted; nothing is ever `null`. Obtain a token \
         with the OAuth 2.0 client-credentials grant at `/oauth2/token`."
            .into(),
    );

    let mut openapi = OpenApi::new(info, paths);
    openapi.servers = Some(vec![Server::new("/")]);
    openapi.components = Some(components);
    openapi.security = Some(vec![SecurityRequirement::new(
        SECURITY_SCHEME,
        Vec::<String>::new(),
    )]);
    openapi.tags = Some(tags);
    openapi
}

/// The route's gRPC service and method in the contract.
fn grpc_method(
    pool: &DescriptorPool,
    route: &Route,
) -> Option<(ServiceDescriptor, MethodDescriptor)> {
    let (service, method) = route.grpc_path.strip_prefix('/')?.split_once('/')?;
    let service = pool.get_service_by_name(service)?;
    let method = service.methods().find(|m| m.name() == method)?;
    Some((service, method))
}

fn tag_of(route: &Route, service: &ServiceDescriptor) -> String {
    OPERATION_TAGS
        .iter()
        .find(|(op, _)| *op == route.operation_id)
        .map_or_else(|| service.name().to_lowercase(), |(_, tag)| (*tag).into())
}

fn http_method(route: &Route) -> HttpMethod {
    match route.method {
        http::Method::GET => HttpMethod::Get,
        http::Method::PUT => HttpMethod::Put,
        http::Method::DELETE => HttpMethod::Delete,
        http::Method::PATCH => HttpMethod::Patch,
        http::Method::HEAD => HttpMethod::Head,
        _ => HttpMethod::Post,
    }
}

fn route_operation(
    route: &Route,
    method: &MethodDescriptor,
    tag: String,
    schemas: &mut Schemas,
) -> Operation {
    let mut op = Operation::new();
    op.tags = Some(vec![tag]);
    op.operation_id = Some(route.operation_id.into());
    let description = comment_of(&method.parent_file(), method.path());
    op.summary = description.as_deref().map(first_sentence);
    op.description = description;
    let input = method.input();
    match route.body {
        RequestBody::OptionalObject => {
            let mut body = OpenApiRequestBody::new();
            body.description = comment_of(&input.parent_file(), input.path());
            body.required = Some(Required::False);
            body.content.insert(
                "application/json".into(),
                RefOr::T(Content::new(Some(schemas.reference(&input, None)))),
            );
            op.request_body = Some(RefOr::T(body));
        }
        RequestBody::BareArray { field } => {
            let parameters: Vec<_> = super::routes::query_fields(route, &input)
                .iter()
                .map(|field| {
                    let mut p = Parameter::new(field.json_name());
                    p.parameter_in = ParameterIn::Query;
                    p.required = Required::False;
                    p.description = field_comment(field);
                    p.schema = Some(schemas.value(field));
                    RefOr::T(p)
                })
                .collect();
            if !parameters.is_empty() {
                op.parameters = Some(parameters);
            }
            if let Some(field) = input.get_field_by_name(field)
                && let Kind::Message(item) = field.kind()
            {
                let mut body = OpenApiRequestBody::new();
                body.description = field_comment(&field);
                body.required = Some(Required::True);
                let array = Array::new(schemas.reference(&item, Some(&field)));
                body.content.insert(
                    "application/json".into(),
                    RefOr::T(Content::new(Some(Schema::Array(array)))),
                );
                op.request_body = Some(RefOr::T(body));
            }
        }
        RequestBody::PathParams { fields } => {
            let names = path_parameter_names(route.path);
            let mut parameters = Vec::new();
            for (name, field) in names.iter().zip(fields) {
                let Some(field) = input.get_field_by_name(field) else {
                    continue;
                };
                let mut p = Parameter::new(*name);
                p.parameter_in = ParameterIn::Path;
                p.required = Required::True;
                p.description = field_comment(&field);
                p.schema = Some(schemas.value(&field));
                parameters.push(RefOr::T(p));
            }
            op.parameters = Some(parameters);
        }
    }
    let output = method.output();
    let mut ok = Response::new(
        comment_of(&output.parent_file(), output.path())
            .unwrap_or_else(|| "Successful operation.".into()),
    );
    ok.content.insert(
        "application/json".into(),
        RefOr::T(Content::new(Some(schemas.reference(&output, None)))),
    );
    let mut responses = Responses::new();
    responses.responses.insert("200".into(), RefOr::T(ok));
    for &(status, description, header) in ERROR_STATUSES {
        responses.responses.insert(
            status.to_string(),
            RefOr::T(error_response(description, header)),
        );
    }
    op.responses = responses;
    op
}

/// The `{name}` segments of a path template, in order.
fn path_parameter_names(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

fn error_response(description: &str, header: Option<(&str, &str)>) -> Response {
    let mut response = Response::new(description);
    response.content.insert(
        "application/json".into(),
        RefOr::T(Content::new(Some(Ref::from_schema_name(ERROR_SCHEMA)))),
    );
    if let Some((name, what)) = header {
        let mut h = Header::new(Object::with_type(Type::String));
        h.description = Some(what.into());
        response.headers.insert(name.into(), RefOr::T(h));
    }
    response
}

fn health_operation(operation_id: &str) -> Operation {
    let mut op = Operation::new();
    op.tags = Some(vec!["health".into()]);
    op.operation_id = Some(operation_id.into());
    op.summary = Some("The broker's overall health, for load balancers.".into());
    op.description = Some(
        "`SERVING` when the broker's gRPC health (service \"\") is SERVING, \
         else `NOT_SERVING` with status 503. Open: no token."
            .into(),
    );
    // An empty list: no security requirement applies (the route is open).
    op.security = Some(Vec::new());
    let mut responses = Responses::new();
    for (status, what) in [("200", "Serving."), ("503", "Not serving.")] {
        let mut r = Response::new(what);
        r.content.insert(
            "application/json".into(),
            RefOr::T(Content::new(Some(Ref::from_schema_name("HealthStatus")))),
        );
        responses.responses.insert(status.into(), RefOr::T(r));
    }
    op.responses = responses;
    op
}

fn string_property(description: &str) -> Object {
    let mut o = Object::with_type(Type::String);
    o.description = Some(description.into());
    o
}

fn error_schema() -> Object {
    let mut o = Object::with_type(Type::Object);
    o.description = Some(
        "dcv-broker's error body (DCV documents none): the same shape as its \
         OAuth 2.0 token endpoint's errors (RFC 6749 section 5.2)."
            .into(),
    );
    o.properties.insert(
        "error".into(),
        string_property(
            "A short code, for example invalid_request, invalid_token, \
             insufficient_scope, not_found, payload_too_large, \
             too_many_requests.",
        )
        .into(),
    );
    o.properties.insert(
        "error_description".into(),
        string_property("What went wrong, in a sentence.").into(),
    );
    o.properties.insert(
        "request_id".into(),
        string_property("The request's id, as logged by the broker, when known.").into(),
    );
    let mut violations = Array::new(Ref::from_schema_name("FieldViolation"));
    violations.description = Some("The fields at fault, for some 400 replies.".into());
    o.properties
        .insert("field_violations".into(), Schema::Array(violations).into());
    o.required = vec!["error".into(), "error_description".into()];
    o
}

fn field_violation_schema() -> Object {
    let mut o = Object::with_type(Type::Object);
    o.description = Some("One field of a request and what is wrong with it.".into());
    o.properties.insert(
        "field".into(),
        string_property("The field's path in the request, JSON names.").into(),
    );
    o.properties.insert(
        "description".into(),
        string_property("What is wrong with it.").into(),
    );
    o.required = vec!["field".into(), "description".into()];
    o
}

fn health_schema() -> Object {
    let mut o = Object::with_type(Type::Object);
    o.description = Some("The broker's health.".into());
    let mut status = string_property("SERVING or NOT_SERVING.");
    status.enum_values = Some(vec!["SERVING".into(), "NOT_SERVING".into()]);
    o.properties.insert("status".into(), status.into());
    o.required = vec!["status".into()];
    o
}

/// The component schemas reachable from the routes, generated on demand.
#[derive(Default)]
struct Schemas {
    /// Schema names handed out so far (each is generated once), with the
    /// message each names.
    named: BTreeMap<String, String>,
    /// Generated schemas, in the order first referenced.
    done: Vec<(String, Object)>,
}

impl Schemas {
    /// A reference to `message`'s component schema (reached through
    /// `via`, if through a field), generating the schema on first use.
    fn reference(&mut self, message: &MessageDescriptor, via: Option<&FieldDescriptor>) -> Ref {
        let name = schema_name(message, via);
        match self.named.get(&name) {
            Some(named) => {
                // Two messages under one name would describe one of them
                // wrongly; the tables above must not map two to one name.
                debug_assert_eq!(named, message.full_name(), "schema name {name}");
            }
            None => {
                self.named.insert(name.clone(), message.full_name().into());
                let object = self.object(message);
                self.done.push((name.clone(), object));
            }
        }
        Ref::from_schema_name(name)
    }

    fn finish(self) -> BTreeMap<String, RefOr<Schema>> {
        self.done
            .into_iter()
            .map(|(name, object)| (name, RefOr::T(Schema::Object(object))))
            .collect()
    }

    fn object(&mut self, message: &MessageDescriptor) -> Object {
        let mut o = Object::with_type(Type::Object);
        o.description = comment_of(&message.parent_file(), message.path());
        for field in message.fields() {
            let schema = self.field(&field);
            o.properties.insert(field.json_name().into(), schema);
        }
        o
    }

    /// A field's schema, with the field's description.
    fn field(&mut self, field: &FieldDescriptor) -> RefOr<Schema> {
        let description = field_comment(field);
        if field.is_map() {
            let mut o = Object::with_type(Type::Object);
            if let Kind::Message(entry) = field.kind()
                && let Some(value) = entry.get_field(2)
            {
                o.additional_properties =
                    Some(Box::new(AdditionalProperties::RefOr(self.value(&value))));
            }
            o.description = description;
            return RefOr::T(Schema::Object(o));
        }
        if field.is_list() {
            let mut array = Array::new(self.value(field));
            array.description = description;
            return RefOr::T(Schema::Array(array));
        }
        match self.value(field) {
            RefOr::Ref(mut r) => {
                r.description = description.unwrap_or_default();
                RefOr::Ref(r)
            }
            RefOr::T(Schema::Object(mut o)) => {
                o.description = description;
                RefOr::T(Schema::Object(o))
            }
            other => other,
        }
    }

    /// The schema of one value of a field (an item, for a list).
    fn value(&mut self, field: &FieldDescriptor) -> RefOr<Schema> {
        let scalar = |ty: Type, format: Option<KnownFormat>| {
            let mut o = Object::with_type(ty);
            o.format = format.map(SchemaFormat::KnownFormat);
            RefOr::T(Schema::Object(o))
        };
        match field.kind() {
            Kind::Double => scalar(Type::Number, Some(KnownFormat::Double)),
            Kind::Float => scalar(Type::Number, Some(KnownFormat::Float)),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                scalar(Type::Integer, Some(KnownFormat::Int32))
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                scalar(Type::Integer, Some(KnownFormat::Int64))
            }
            Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
                let mut o = Object::with_type(Type::Integer);
                o.minimum = Some(0.into());
                RefOr::T(Schema::Object(o))
            }
            Kind::Bool => scalar(Type::Boolean, None),
            Kind::String => scalar(Type::String, None),
            Kind::Bytes => scalar(Type::String, Some(KnownFormat::Byte)),
            Kind::Enum(e) => RefOr::T(Schema::Object(enum_schema(&e))),
            Kind::Message(m) => match m.full_name() {
                "google.protobuf.Timestamp" => scalar(Type::String, Some(KnownFormat::DateTime)),
                "google.protobuf.Duration" => scalar(Type::String, None),
                _ => RefOr::Ref(self.reference(&m, Some(field))),
            },
        }
    }
}

/// An enum as the adapter writes it: a string, one of its value names; the
/// zero value (`*_UNSPECIFIED`) is never written (the field is omitted).
fn enum_schema(e: &EnumDescriptor) -> Object {
    let mut o = Object::with_type(Type::String);
    o.enum_values = Some(
        e.values()
            .filter(|v| v.number() != 0)
            .map(|v| v.name().into())
            .collect(),
    );
    o
}

fn schema_name(message: &MessageDescriptor, via: Option<&FieldDescriptor>) -> String {
    if let Some(field) = via
        && let Some((_, name)) = FIELD_SCHEMA_NAMES
            .iter()
            .find(|(f, _)| *f == field.full_name())
    {
        return (*name).into();
    }
    MESSAGE_SCHEMA_NAMES
        .iter()
        .find(|(m, _)| *m == message.full_name())
        .map_or_else(|| message.name().into(), |(_, name)| (*name).into())
}

/// A field's leading comment in the contract, as the document shows it.
pub(super) fn field_comment(field: &FieldDescriptor) -> Option<String> {
    comment_of(&field.parent_file(), field.path())
}

/// The leading comment of the element at `path` in `file`, one space of
/// indentation removed from each line (proto's `// text` style).
fn comment_of(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let lines: Vec<&str> = text
        .lines()
        .map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end())
        .collect();
    let joined = lines.join("\n").trim().to_owned();
    (!joined.is_empty()).then_some(joined)
}

/// The first sentence of a comment, on one line: an operation's summary.
fn first_sentence(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.find(". ") {
        Some(end) => one_line[..=end].to_owned(),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> serde_json::Value {
        // The served bytes, read back as any client would.
        yaml_serde::from_slice(document()).expect("the served document is YAML")
    }

    #[test]
    fn the_served_document_is_openapi() {
        let value = served();
        let parsed: OpenApi =
            serde_json::from_value(value.clone()).expect("utoipa's model reads it back");
        // Compared as JSON: utoipa's model reads some equivalent spellings
        // back as other variants (a 3.1 `type` as a list, ...).
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::to_value(build()).unwrap(),
            "the served bytes are the built document, read back without loss"
        );
        assert_eq!(value, serde_json::to_value(build()).unwrap());
        assert_eq!(value["openapi"], "3.1.0");
        assert!(value["info"]["title"].is_string());
        assert!(value["info"]["version"].is_string());
    }

    /// Every `$ref` in the document points at a component that exists, and
    /// every component is referenced (nothing generated for nothing).
    #[test]
    fn every_reference_resolves() {
        use std::collections::BTreeSet;
        fn walk(v: &serde_json::Value, refs: &mut BTreeSet<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::String(r)) = map.get("$ref") {
                        refs.insert(r.clone());
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        let value = served();
        let mut refs = BTreeSet::new();
        walk(&value, &mut refs);
        let schemas = value["components"]["schemas"].as_object().unwrap();
        for r in &refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r}: not a schema reference"));
            assert!(schemas.contains_key(name), "{r} does not resolve");
        }
        for name in schemas.keys() {
            assert!(
                refs.contains(&format!("#/components/schemas/{name}")),
                "component {name} is never referenced"
            );
        }
    }

    #[test]
    fn every_route_is_documented_with_its_method_and_body() {
        let value = served();
        for route in ROUTES {
            let method = route.method.as_str().to_lowercase();
            let op = &value["paths"][route.path][&method];
            assert!(op.is_object(), "{} {} is missing", route.method, route.path);
            assert_eq!(op["operationId"], route.operation_id, "{}", route.path);
            for status in [
                "200", "400", "401", "403", "404", "405", "413", "415", "429", "503",
            ] {
                let schema = &op["responses"][status]["content"]["application/json"]["schema"];
                assert!(
                    schema["$ref"].is_string(),
                    "{} {status}: no schema",
                    route.path
                );
            }
            assert_eq!(
                op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorResponse"
            );
            let body = &op["requestBody"];
            match route.body {
                RequestBody::BareArray { .. } => {
                    assert_eq!(body["required"], true, "{}", route.path);
                    let schema = &body["content"]["application/json"]["schema"];
                    assert_eq!(schema["type"], "array", "{}", route.path);
                    assert!(schema["items"]["$ref"].is_string(), "{}", route.path);
                }
                RequestBody::OptionalObject => {
                    assert_eq!(body["required"], false, "{}", route.path);
                    let schema = &body["content"]["application/json"]["schema"];
                    assert!(schema["$ref"].is_string(), "{}", route.path);
                }
                RequestBody::PathParams { fields } => {
                    assert!(body.is_null(), "{}", route.path);
                    let params = op["parameters"].as_array().unwrap();
                    assert_eq!(params.len(), fields.len(), "{}", route.path);
                    for (p, name) in params.iter().zip(path_parameter_names(route.path)) {
                        assert_eq!(p["name"], name);
                        assert_eq!(p["in"], "path");
                        assert_eq!(p["required"], true);
                        assert_eq!(p["schema"]["type"], "string");
                    }
                }
            }
            // Nothing but the routes' methods on the route's path.
            let methods: Vec<&String> = value["paths"][route.path]
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| !matches!(k.as_str(), "parameters" | "summary" | "description"))
                .collect();
            assert_eq!(methods, vec![&method], "{}", route.path);
        }
        assert_eq!(
            value["paths"].as_object().unwrap().len(),
            ROUTES.len() + 1,
            "the routes and /health, nothing else"
        );
        assert_eq!(
            value["paths"]["/health"]["get"]["security"],
            serde_json::json!([])
        );
        assert!(value["paths"]["/health"]["head"].is_object());
        assert_eq!(
            value["components"]["securitySchemes"]["bearerAuth"],
            serde_json::json!({"type": "http", "scheme": "bearer"})
        );
        assert_eq!(value["security"], serde_json::json!([{"bearerAuth": []}]));
    }

    /// The adapter's rules, on fields that exercise each of them.
    #[test]
    fn fields_follow_the_wire_adapter() {
        let value = served();
        let schemas = &value["components"]["schemas"];
        let field = |schema: &str, field: &str| schemas[schema]["properties"][field].clone();
        assert_eq!(field("Server", "ConsoleSessionCount")["format"], "int32");
        assert_eq!(field("Memory", "TotalBytes")["type"], "integer");
        assert_eq!(field("Memory", "TotalBytes")["format"], "int64");
        assert_eq!(field("Swap", "UsedBytes")["format"], "int64");
        assert_eq!(field("CpuLoadAverage", "OneMinute")["type"], "number");
        assert_eq!(field("CpuLoadAverage", "OneMinute")["format"], "float");
        assert_eq!(field("Session", "CreationTime")["format"], "date-time");
        assert_eq!(field("SessionScreenshotImage", "Data")["format"], "byte");
        assert_eq!(field("Server", "Tags")["type"], "array");
        assert_eq!(
            field("Server", "Tags")["items"]["$ref"],
            "#/components/schemas/KeyValuePair"
        );
        assert_eq!(field("Server", "Host")["$ref"], "#/components/schemas/Host");
        let codes = field("CloseServerUnsuccessfulResponse", "FailureCode");
        assert_eq!(codes["type"], "string");
        let codes: Vec<&str> = codes["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(codes.contains(&"DCV_SERVER_NOT_FOUND"));
        assert!(!codes.iter().any(|c| c.ends_with("_UNSPECIFIED")));
        // Descriptions come from the proto comments.
        assert!(
            field("Server", "Holds")["description"]
                .as_str()
                .unwrap()
                .starts_with("Beyond DCV")
        );
        assert!(schemas["Server"]["description"].is_string());
        // The bare-array wrappers are not schemas of their own.
        assert!(schemas["CloseServersRequest"].is_null());
        assert!(schemas["MemoryInfo"].is_null());
    }

    /// The naming tables name things that exist: no stale entry.
    #[test]
    fn every_naming_table_entry_is_used() {
        let value = served();
        let schemas = &value["components"]["schemas"];
        for (message, name) in MESSAGE_SCHEMA_NAMES {
            assert!(
                schemas[name].is_object(),
                "{message} -> {name}: not generated"
            );
        }
        for (field, name) in FIELD_SCHEMA_NAMES {
            assert!(
                schemas[name].is_object(),
                "{field} -> {name}: not generated"
            );
        }
        for (operation, _) in OPERATION_TAGS {
            assert!(
                ROUTES.iter().any(|r| r.operation_id == *operation),
                "{operation}: no such route"
            );
        }
    }

    #[test]
    fn comments_lose_only_the_comment_indentation() {
        assert_eq!(
            first_sentence("Closes servers. Then more."),
            "Closes servers."
        );
        assert_eq!(first_sentence("One\nsentence"), "One sentence");
        assert_eq!(path_parameter_names("/a/{b}/c/{d}"), vec!["b", "d"]);
    }
}
