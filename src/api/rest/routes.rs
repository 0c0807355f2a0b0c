//! The REST routes DCV Session Manager's OpenAPI file defines, each tied to
//! the gRPC method that does its work: the one table the REST adapter and
//! our OpenAPI document are both built from.

use http::Method;
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

/// How a route's HTTP request becomes its gRPC request message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// A bare JSON array (DCV's batch operations); its items become the
    /// request message's repeated field with this protobuf field name.
    BareArray {
        /// The repeated field of the request message (protobuf name).
        field: &'static str,
    },
    /// A JSON object that is the request message itself; no body, an empty
    /// body or `{}` is the default request ("everything").
    OptionalObject,
    /// No body: the path's `{...}` segments fill these request fields
    /// (protobuf names), in order.
    PathParams {
        /// The request message's fields, one per path template segment.
        fields: &'static [&'static str],
    },
}

/// One REST route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method DCV uses.
    pub method: Method,
    /// DCV's path, case-sensitive, with `{name}` templates.
    pub path: &'static str,
    /// DCV's operationId.
    pub operation_id: &'static str,
    /// The gRPC method that does the work: its request and response types
    /// are the route's body and reply.
    pub grpc_path: &'static str,
    /// How the request is carried.
    pub body: RequestBody,
}

macro_rules! grpc {
    ($service:ident, $method:literal) => {
        concat!(
            "/dcv.sessionmanager.v1.",
            stringify!($service),
            "/",
            $method
        )
    };
}

/// Beyond DCV: the watch streams as server-sent events (`api::rest::sse`),
/// `GET` with query parameters. Not DCV's, so not in [`ROUTES`] (nor in
/// the OpenAPI document built from it); routed like them otherwise.
pub static WATCH_ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/watchServers",
        operation_id: "watchServers",
        grpc_path: grpc!(Servers, "WatchServers"),
        body: RequestBody::OptionalObject,
    },
    Route {
        method: Method::GET,
        path: "/watchSessions",
        operation_id: "watchSessions",
        grpc_path: grpc!(Sessions, "WatchSessions"),
        body: RequestBody::OptionalObject,
    },
];

/// Every REST route, in the order of DCV's API reference.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::POST,
        path: "/describeSessions",
        operation_id: "describeSessions",
        grpc_path: grpc!(Sessions, "DescribeSessions"),
        body: RequestBody::OptionalObject,
    },
    Route {
        method: Method::POST,
        path: "/describeServers",
        operation_id: "describeServers",
        grpc_path: grpc!(Servers, "DescribeServers"),
        body: RequestBody::OptionalObject,
    },
    Route {
        method: Method::POST,
        path: "/createSessions",
        operation_id: "createSessions",
        grpc_path: grpc!(Sessions, "CreateSessions"),
        body: RequestBody::BareArray { field: "sessions" },
    },
    Route {
        method: Method::POST,
        path: "/deleteSessions",
        operation_id: "deleteSessions",
        grpc_path: grpc!(Sessions, "DeleteSessions"),
        body: RequestBody::BareArray { field: "sessions" },
    },
    Route {
        method: Method::PUT,
        path: "/sessionPermissions",
        operation_id: "updateSessionPermissions",
        grpc_path: grpc!(Sessions, "UpdateSessionPermissions"),
        body: RequestBody::BareArray { field: "sessions" },
    },
    Route {
        method: Method::GET,
        path: "/sessionConnectionData/{sessionId}/{user}",
        operation_id: "GetSessionConnectionData",
        grpc_path: grpc!(Sessions, "GetSessionConnectionData"),
        body: RequestBody::PathParams {
            fields: &["session_id", "user"],
        },
    },
    Route {
        method: Method::POST,
        path: "/getSessionScreenshots",
        operation_id: "getSessionScreenshots",
        grpc_path: grpc!(Sessions, "GetSessionScreenshots"),
        body: RequestBody::BareArray { field: "sessions" },
    },
    Route {
        method: Method::POST,
        path: "/openServers",
        operation_id: "openServers",
        grpc_path: grpc!(Servers, "OpenServers"),
        body: RequestBody::BareArray { field: "servers" },
    },
    Route {
        method: Method::POST,
        path: "/closeServers",
        operation_id: "closeServers",
        grpc_path: grpc!(Servers, "CloseServers"),
        body: RequestBody::BareArray { field: "servers" },
    },
];

/// The request fields a route takes as query parameters, by their JSON
/// names: a batch route's body is a bare array, so its request-level
/// fields (`ClientToken`, `DryRun`, `CapacityTagKey`) come in the query;
/// every top-level singular scalar or enum field of its request message.
/// Other routes take none (their body or path carries every field).
pub fn query_fields(route: &Route, input: &MessageDescriptor) -> Vec<FieldDescriptor> {
    if !matches!(route.body, RequestBody::BareArray { .. }) {
        return Vec::new();
    }
    input
        .fields()
        .filter(|f| !f.is_list() && !f.is_map())
        .filter(|f| {
            !matches!(
                f.kind(),
                Kind::Message(_) | Kind::Bytes | Kind::Float | Kind::Double
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_names_a_method_of_the_contract() {
        let pool = crate::pb::descriptor_pool();
        for route in ROUTES {
            let (service, method) = route.grpc_path[1..]
                .split_once('/')
                .expect("a gRPC path is /service/method");
            let service = pool
                .get_service_by_name(service)
                .unwrap_or_else(|| panic!("{}: no service {service}", route.path));
            let method = service
                .methods()
                .find(|m| m.name() == method)
                .unwrap_or_else(|| panic!("{}: no method {method}", route.path));
            let input = method.input();
            let fields: Vec<&str> = match route.body {
                RequestBody::BareArray { field } => vec![field],
                RequestBody::OptionalObject => vec![],
                RequestBody::PathParams { fields } => fields.to_vec(),
            };
            for field in fields {
                assert!(
                    input.get_field_by_name(field).is_some(),
                    "{}: {} has no field {field}",
                    route.path,
                    input.full_name()
                );
            }
        }
    }
}
