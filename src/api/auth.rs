//! Authentication and authorization of every gRPC call: a tower layer that
//! finds the caller (a bearer token, or an agent's client certificate),
//! checks the scope the method needs in one table ([`access`]), and hands
//! the [`Principal`] to the handlers through the request's extensions.
//!
//! Deny by default: a method missing from the table is refused to every
//! caller. Health and reflection stay open unless configured otherwise,
//! because load balancers and service meshes probe them without
//! credentials and they reveal nothing about the fleet.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio_stream::{Stream as _, wrappers::WatchStream};
use tonic::{Status, body::Body, transport::server::TlsConnectInfo};

use crate::{
    auth::{Auth, AuthError, Principal, Scope, ScopeSet},
    layer::{Policy, PolicyLayer, PolicyService, Verdict},
};

use super::{ANONYMOUS_ACTOR, forward::Forwarded};

const SERVERS: &str = "dcv.sessionmanager.v1.Servers";
const SESSIONS: &str = "dcv.sessionmanager.v1.Sessions";
const AGENT: &str = "dcv.sessionmanager.v1.Agent";

/// What a call to a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: anyone may call it.
    Open,
    /// A valid token (or agent certificate), whatever its scopes.
    Authenticated,
    /// A caller holding this scope.
    Scope(Scope),
    /// Nobody: a method the broker does not know.
    Denied,
}

/// Which unauthenticated services stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenServices {
    /// `grpc.health.v1.Health`.
    pub health: bool,
    /// Server reflection, both versions.
    pub reflection: bool,
}

impl Default for OpenServices {
    fn default() -> Self {
        OpenServices {
            health: true,
            reflection: true,
        }
    }
}

/// The scope each method needs: the one table of authorization.
pub fn access(path: &str, open: OpenServices) -> Access {
    let open_if = |yes: bool| {
        if yes {
            Access::Open
        } else {
            Access::Authenticated
        }
    };
    // The HTTP gate answers these two before this layer; they are listed
    // so that the table stays the whole truth. Neither can carry a bearer
    // token: a token request is how a client gets one, and DCV servers
    // verifying a user's connection token hold none (the connection token
    // is the credential).
    if path == crate::api::oauth::TOKEN_PATH || path == crate::api::verifier::VERIFIER_PATH {
        return Access::Open;
    }
    if crate::transport::is_health(path) {
        return open_if(open.health);
    }
    if crate::transport::is_reflection(path) {
        return open_if(open.reflection);
    }
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Access::Denied;
    };
    let scope = match (service, method) {
        (
            SERVERS,
            "DescribeServers" | "DescribeServerHistory" | "WatchServers" | "DescribeDrains",
        )
        | (SESSIONS, "DescribeSessions" | "WatchSessions") => Scope::Read,
        (SERVERS, "CloseServers" | "OpenServers" | "DrainServers") => Scope::OperateServers,
        (
            SESSIONS,
            "CreateSessions"
            | "DeleteSessions"
            | "GetSessionConnectionData"
            | "UpdateSessionPermissions"
            | "GetSessionScreenshots",
        ) => Scope::ManageSessions,
        (
            AGENT,
            "RegisterServer"
            | "Heartbeat"
            | "DeregisterServer"
            | "StreamInstructions"
            | "ReportInstructionResult"
            | "ValidateConnectionToken",
        ) => Scope::Agent,
        _ => return Access::Denied,
    };
    Access::Scope(scope)
}

/// The layer that authenticates and authorizes every call.
pub type AuthLayer = PolicyLayer<AuthPolicy>;

/// The service [`AuthLayer`] wraps around the routes.
pub type Authorize<S> = PolicyService<AuthPolicy, S>;

/// The policy of [`AuthLayer`]: the clients, and what stays open.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    auth: Auth,
    open: OpenServices,
}

impl AuthLayer {
    /// Checks calls against `auth`'s clients, leaving `open` services open.
    pub fn new(auth: Auth, open: OpenServices) -> AuthLayer {
        PolicyLayer::of(AuthPolicy {
            shared: Arc::new(Shared { auth, open }),
        })
    }
}

impl<B> Policy<B> for AuthPolicy {
    /// An instruction stream's client, whose revocation ends the stream.
    type Hold = Option<(Auth, Arc<str>)>;

    fn check<E: Send + 'static>(&self, mut request: http::Request<B>) -> Verdict<B, Self::Hold, E> {
        let access = access(request.uri().path(), self.shared.open);
        if access == Access::Open {
            return Verdict::Pass(request, None);
        }
        match authorize(&self.shared.auth, &request, access) {
            Ok(principal) => {
                tracing::Span::current().record("client", &*principal.client_id);
                // A token client's stream (direct or forwarded) ends when
                // the client is revoked; a certificate has no client.
                let revocable = (request.uri().path() == INSTRUCTION_STREAM
                    && !principal.client_id.starts_with(MTLS_PREFIX))
                .then(|| (self.shared.auth.clone(), principal.client_id.clone()));
                request.extensions_mut().insert(principal);
                Verdict::Pass(request, revocable)
            }
            Err(e) => {
                tracing::debug!(error = %e, "refused");
                Verdict::Answer(Status::from(e).into_http())
            }
        }
    }

    fn respond(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        match hold {
            None => response,
            Some((auth, client_id)) => {
                response.map(|body| Body::new(EndOnRevocation::new(body, auth, client_id)))
            }
        }
    }
}

/// The one call that outlives its authorization: an agent's instruction
/// stream, open for hours.
const INSTRUCTION_STREAM: &str = "/dcv.sessionmanager.v1.Agent/StreamInstructions";

/// A response body that ends, with UNAUTHENTICATED, once its client is
/// revoked: revocation ends a client's tokens at once, and so the streams
/// they opened. (A certificate agent has no client to revoke.)
struct EndOnRevocation {
    inner: Body,
    auth: Auth,
    client_id: Arc<str>,
    revocations: WatchStream<()>,
    ended: bool,
}

impl EndOnRevocation {
    fn new(inner: Body, auth: Auth, client_id: Arc<str>) -> EndOnRevocation {
        // Yields at once, so a revocation since the call was authorized
        // counts too.
        let revocations = WatchStream::new(auth.revocations());
        EndOnRevocation {
            inner,
            auth,
            client_id,
            revocations,
            ended: false,
        }
    }
}

impl http_body::Body for EndOnRevocation {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        while let Poll::Ready(Some(())) = Pin::new(&mut this.revocations).poll_next(cx) {
            if !this.auth.is_active(&this.client_id) {
                this.ended = true;
                tracing::info!(client = %this.client_id, "client revoked: ending its stream");
                let mut trailers = http::HeaderMap::new();
                Status::unauthenticated("invalid bearer token: its client was revoked")
                    .add_header(&mut trailers)?;
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

/// How a certificate agent's client id starts: it names no registered
/// client.
const MTLS_PREFIX: &str = "mtls:";

fn authorize<B>(
    auth: &Auth,
    request: &http::Request<B>,
    access: Access,
) -> Result<Principal, AuthError> {
    let forwarded = request.extensions().get::<Forwarded>();
    let principal = match (
        forwarded,
        request.headers().get(http::header::AUTHORIZATION),
    ) {
        // A call another replica forwarded, whose signed identity the
        // request-id layer verified: the caller that replica
        // authenticated, as long as its client is still active here (a
        // revocation reaches replicas a moment apart).
        (Some(forwarded), _) => match &forwarded.principal {
            Some(p) if p.client_id.starts_with(MTLS_PREFIX) || auth.is_active(&p.client_id) => {
                p.clone()
            }
            Some(_) => {
                return Err(AuthError::InvalidToken(
                    "its client is no longer active (forwarded call)".into(),
                ));
            }
            None => {
                return Err(AuthError::Missing(
                    "a forwarded call without a caller, from a replica running without \
                     authentication"
                        .to_owned(),
                ));
            }
        },
        (None, Some(value)) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .ok_or_else(|| {
                    AuthError::Missing(
                        "the authorization header is not `Bearer <token>`".to_owned(),
                    )
                })?;
            auth.authenticate(token)?
        }
        (None, None) => certificate_principal(request.extensions()).ok_or_else(|| {
            AuthError::Missing(
                "this call needs credentials: send `authorization: Bearer <token>` with a token \
                 from POST /oauth2/token?grant_type=client_credentials"
                    .to_owned(),
            )
        })?,
    };
    match access {
        Access::Open | Access::Authenticated => Ok(principal),
        Access::Scope(scope) if principal.scopes.contains(scope) => Ok(principal),
        Access::Scope(scope) => Err(AuthError::Forbidden(format!(
            "client {} lacks the scope \"{scope}\" that {} needs (it has: {})",
            principal.client_id,
            request.uri().path(),
            if principal.scopes.is_empty() {
                "none".to_owned()
            } else {
                principal.scopes.to_string()
            }
        ))),
        Access::Denied => Err(AuthError::Forbidden(format!(
            "{} is not a method any scope allows",
            request.uri().path()
        ))),
    }
}

/// An agent authenticated by mutual TLS: its verified client certificate
/// names the one server it acts for.
fn certificate_principal(extensions: &http::Extensions) -> Option<Principal> {
    let info = extensions.get::<TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let server_id = crate::tls::agent_server_id(certs.first()?)?;
    Some(Principal {
        client_id: format!("{MTLS_PREFIX}{server_id}").into(),
        scopes: ScopeSet::from(Scope::Agent),
        server_id: Some(server_id.into()),
    })
}

/// The caller of a request, once [`AuthLayer`] admitted it; `None` when the
/// broker runs without authentication.
pub fn principal<T>(request: &tonic::Request<T>) -> Option<&Principal> {
    request.extensions().get::<Principal>()
}

/// Who is recorded as the actor of a change: the client id, or
/// [`ANONYMOUS_ACTOR`] without authentication.
pub fn actor<T>(request: &tonic::Request<T>) -> String {
    principal(request).map_or_else(|| ANONYMOUS_ACTOR.to_owned(), |p| p.client_id.to_string())
}

/// Refuses an agent call about a server other than the caller's own.
pub fn check_agent<T>(request: &tonic::Request<T>, server_id: &str) -> Result<(), Status> {
    match principal(request) {
        Some(p) if !p.may_act_for(server_id) => Err(AuthError::Forbidden(format!(
            "agent {} may act only for server {:?}, not {server_id:?}",
            p.client_id,
            p.server_id.as_deref().unwrap_or_default()
        ))
        .into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Every method of every service in the published contract has an
    /// entry in the table: a new RPC cannot ship without a scope.
    #[test]
    fn every_method_in_the_contract_needs_a_scope() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert!(
                        matches!(access(&path, OpenServices::default()), Access::Scope(_)),
                        "{path} has no scope"
                    );
                    methods += 1;
                }
            }
        }
        assert_eq!(methods, 7 + 7 + 6);
    }

    #[test]
    fn unknown_methods_are_denied_and_open_services_configurable() {
        let open = OpenServices::default();
        assert_eq!(
            access("/dcv.sessionmanager.v1.Servers/Nuke", open),
            Access::Denied
        );
        assert_eq!(access("/other.Service/Call", open), Access::Denied);
        assert_eq!(access("/grpc.health.v1.Health/Check", open), Access::Open);
        let closed = OpenServices {
            health: false,
            reflection: false,
        };
        assert_eq!(
            access("/grpc.health.v1.Health/Check", closed),
            Access::Authenticated
        );
        assert_eq!(
            access(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                closed
            ),
            Access::Authenticated
        );
        assert_eq!(access("/oauth2/token", closed), Access::Open);
        assert_eq!(
            access("/agent/validate-authentication-token", closed),
            Access::Open
        );
        // Only that exact path: its neighbours are no method.
        assert_eq!(
            access("/agent/validate-authentication-token/x", closed),
            Access::Denied
        );
        assert_eq!(access("/agent/other", closed), Access::Denied);
    }
}
