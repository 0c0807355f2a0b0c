//! Idempotent retries at the API's edge: the `ClientToken` of the six
//! mutating calls (CloseServers, OpenServers, DrainServers, CreateSessions,
//! DeleteSessions, UpdateSessionPermissions), over gRPC and REST alike.
//!
//! Without a token nothing here runs beyond one emptiness check. With one:
//! the token's form is checked (1 to 64 printable ASCII characters, else
//! INVALID_ARGUMENT on `ClientToken`); a dry run changes nothing and so is
//! just run; otherwise the request, encoded with its token cleared, is
//! hashed (SHA-256) and the token claimed in the fleet's table under the
//! caller (`auth::actor`) and the method (see `fleet::client_tokens`):
//! - a first call runs, and its reply is kept once the call's changes (and
//!   its audit record) are durable;
//! - the same request again gets that reply, decoded from the bytes kept:
//!   the same RequestId, nothing applied, nothing audited;
//! - another request under the same token is INVALID_ARGUMENT, a call
//!   while the first still runs ABORTED, a full table RESOURCE_EXHAUSTED;
//! - the same request after the broker stopped while the first call ran
//!   (a crash, a kill, a lost lease) is FAILED_PRECONDITION: the claim is
//!   stored, without a reply, ahead of the call's changes, so a restarted
//!   broker knows the call may have been applied and does not run it again
//!   (a CreateSessions retry would create its sessions twice). The caller
//!   describes what the call names and goes on with a new token. A call that
//!   failed as a whole (an error status) leaves such a claim too: while the
//!   broker runs, a retry runs it anew; after a restart, the retry is told
//!   the outcome is unknown, which is never wrong, only cautious.
//!
//! A call with a token runs in a task of its own, so that a client that
//! gives up (a deadline, a dropped connection: the lost reply a retry is
//! for) does not cancel it between its changes and its record.
//!
//! In a cluster, writes are forwarded to the leader before this runs, so
//! the leader's table answers; a new leader loads the records from the
//! shared database.

use std::future::Future;

use prost::Message;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::Forwarder;
use crate::{
    fleet::{Claim, Fleet, TokenKey, client_tokens},
    pb,
    telemetry::request::CURRENT,
};

/// The body of a mutating RPC's handler: forwarded to the leader when this
/// broker follows one; else served here by `$here` (a method of the
/// adapter taking the request), through [`serve`] when the request carries
/// a `ClientToken`. Without one (nearly every call) the adapter is not
/// cloned and no task is spawned: `$here` runs in place.
///
/// `mutating!(self, request, servers, close_servers, close_servers_here)`
/// where `servers` names the leader's client and `close_servers` its method.
macro_rules! mutating {
    ($api:ident, $request:ident, $client:ident, $method:ident, $here:ident) => {{
        if let Some(leader) = $api.forward.route(&$request)? {
            let forwarded = leader.request($request.into_inner());
            return leader.reply(leader.$client().$method(forwarded)).await;
        }
        if !$crate::api::idempotency::has_token(&mut $request) {
            return $api.$here($request).await;
        }
        let api = $api.clone();
        $crate::api::idempotency::serve(
            &$api.fleet,
            &$api.forward,
            $request,
            move |request| async move { api.$here(request).await },
        )
        .await
    }};
}
pub(crate) use mutating;

/// Whether `request` carries a `ClientToken` (of any form: [`serve`]
/// checks it).
pub fn has_token<M: Tokened>(request: &mut Request<M>) -> bool {
    !request.get_mut().client_token_mut().is_empty()
}

/// A request that may carry a `ClientToken`.
pub trait Tokened: Message + Send + 'static {
    /// The gRPC method's name, part of a token's scope.
    const METHOD: &'static str;

    /// The request's `client_token` field.
    fn client_token_mut(&mut self) -> &mut String;

    /// Whether the request is a dry run (changes nothing, so records no
    /// token).
    fn is_dry_run(&self) -> bool {
        false
    }
}

impl Tokened for pb::CloseServersRequest {
    const METHOD: &'static str = "CloseServers";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
    fn is_dry_run(&self) -> bool {
        self.dry_run
    }
}

impl Tokened for pb::OpenServersRequest {
    const METHOD: &'static str = "OpenServers";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
    fn is_dry_run(&self) -> bool {
        self.dry_run
    }
}

impl Tokened for pb::DrainServersRequest {
    const METHOD: &'static str = "DrainServers";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
}

impl Tokened for pb::CreateSessionsRequest {
    const METHOD: &'static str = "CreateSessions";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
}

impl Tokened for pb::DeleteSessionsRequest {
    const METHOD: &'static str = "DeleteSessions";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
    fn is_dry_run(&self) -> bool {
        self.dry_run
    }
}

impl Tokened for pb::UpdateSessionPermissionsRequest {
    const METHOD: &'static str = "UpdateSessionPermissions";
    fn client_token_mut(&mut self) -> &mut String {
        &mut self.client_token
    }
}

/// Serves `request` through `run` (the adapter's own handling), honouring
/// its `ClientToken` as the module documentation says. `forward` stamps a
/// replayed reply as a fresh one is.
pub async fn serve<M, R, F, Fut>(
    fleet: &Fleet,
    forward: &Forwarder,
    mut request: Request<M>,
    run: F,
) -> Result<Response<R>, Status>
where
    M: Tokened,
    R: Message + Default + Send + 'static,
    F: FnOnce(Request<M>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
{
    if request.get_mut().client_token_mut().is_empty() {
        return run(request).await;
    }
    client_tokens::validate_token(request.get_mut().client_token_mut())?;
    if request.get_ref().is_dry_run() {
        return run(request).await;
    }
    let token = std::mem::take(request.get_mut().client_token_mut());
    let request_hash: [u8; 32] = Sha256::digest(request.get_ref().encode_to_vec()).into();
    let key = TokenKey {
        actor: super::auth::actor(&request),
        method: M::METHOD.to_owned(),
        token,
    };
    let ticket = match fleet.claim_client_token(key, request_hash)? {
        Claim::Replay(reply) => {
            let reply = R::decode(&*reply).map_err(|e| {
                Status::from(crate::fleet::FleetError::Internal(format!(
                    "a kept {} reply does not decode: {e}",
                    M::METHOD
                )))
            })?;
            tracing::debug!(method = M::METHOD, "replayed the reply to a ClientToken");
            return Ok(forward.stamped(reply));
        }
        Claim::New(ticket) => ticket,
    };
    let fleet = fleet.clone();
    let work = async move {
        let response = run(request).await?;
        // `run` returned once the call's changes and its audit record
        // were durable: only now may a retry find the reply.
        fleet
            .keep_client_token(ticket, response.get_ref().encode_to_vec())
            .await;
        Ok(response)
    }
    .instrument(tracing::Span::current());
    // The request's log context is a task-local: carried into the task.
    let handle = match CURRENT.try_with(Clone::clone) {
        Ok(context) => tokio::spawn(CURRENT.scope(context, work)),
        Err(_) => tokio::spawn(work),
    };
    handle.await.map_err(|e| {
        Status::from(crate::fleet::FleetError::Internal(format!(
            "a {} call with a ClientToken failed: {e}",
            M::METHOD
        )))
    })?
}
