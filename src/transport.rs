//! What the broker reads off a request's transport, shared by the layers
//! (`api`, `limits`, `server`) so none of them imports another for it: the
//! peer's address, whether a path is one of the built-in health or
//! reflection services, and whether a message is gRPC at all.

use http::{HeaderMap, header};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The client's address, from the connection information tonic puts in a
/// request's extensions (plaintext or TLS); `None` off TCP.
pub fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
        .and_then(TcpConnectInfo::remote_addr)
}

/// Health checks: never shed, never rate limited, so probes see the truth.
pub fn is_health(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Reflection: grpcurl asks for it before every call, so it is not
/// counted against a client's rate.
pub fn is_reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// `application/grpc`, `application/grpc+proto`, `application/grpc;...`.
pub fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_paths() {
        assert!(is_health("/grpc.health.v1.Health/Check"));
        assert!(is_health("/grpc.health.v1.Health/Watch"));
        assert!(!is_health("/dcv.sessionmanager.v1.Servers/CloseServers"));
        assert!(is_reflection(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_reflection(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_reflection(
            "/dcv.sessionmanager.v1.Servers/DescribeServers"
        ));
    }
}
