//! Builds the audit record of a state-changing call from the request (its
//! actor, request id and peer) and from what the fleet returned for each
//! item, and has it kept before the caller is answered: one
//! [`AuditCall::begin`] and one [`AuditCall::finish`] per RPC.
//!
//! Only the replica that applies a call audits it: a follower forwards
//! writes before this runs, and the leader records the caller's identity
//! and request id as forwarded. Calls refused as a whole (malformed,
//! unauthorized, too large) changed nothing and are not audited; every
//! item of a call that reached the fleet is, with its outcome.

use std::borrow::Cow;

use tonic::Request;

use super::{RequestId, rest::routes::Route};
use crate::{
    fleet::{
        Fleet, ItemFailure,
        persist::{AuditItem, AuditRecord, wall_clock},
    },
    transport::peer_addr,
    wire,
};

/// A REST route's call, as the REST layer marks the gRPC request it
/// builds: audited under the route's name instead of the gRPC method's.
#[derive(Debug, Clone, Copy)]
pub struct RestRoute {
    /// The HTTP method.
    pub method: &'static str,
    /// DCV's path.
    pub path: &'static str,
}

impl RestRoute {
    /// The mark for `route`.
    pub fn of(route: &'static Route) -> RestRoute {
        RestRoute {
            method: route.method.as_str(),
            path: route.path,
        }
    }
}

/// What is known of an audited call before it runs. `None` (nothing
/// built, nothing allocated) when no audit record is wanted.
#[derive(Debug)]
pub struct AuditCall {
    actor: String,
    request_id: String,
    method: Cow<'static, str>,
    peer: Option<String>,
}

impl AuditCall {
    /// The call `request` makes to `method` (the gRPC method's name), if
    /// `fleet` keeps audit records.
    pub fn begin<T>(fleet: &Fleet, request: &Request<T>, method: &'static str) -> Option<Self> {
        if !fleet.keeps_audit() {
            return None;
        }
        let extensions = request.extensions();
        let method = match extensions.get::<RestRoute>() {
            Some(route) => Cow::Owned(format!("{} {}", route.method, route.path)),
            None => Cow::Borrowed(method),
        };
        Some(AuditCall {
            actor: super::auth::actor(request),
            request_id: RequestId::of(request),
            method,
            peer: peer_addr(extensions).map(|a| a.to_string()),
        })
    }

    /// Records the call's items (`id`, its result, the reason the caller
    /// gave) and waits until the record is durable. A record that cannot
    /// be stored is logged, not answered: the change itself is already
    /// durable, and the store failing stops the broker anyway.
    pub async fn finish<'a, T: 'a>(
        call: Option<Self>,
        fleet: &Fleet,
        items: impl IntoIterator<Item = (&'a str, &'a Result<T, ItemFailure>, &'a str)>,
    ) {
        let Some(call) = call else { return };
        let items = items
            .into_iter()
            .map(|(id, result, reason)| match result {
                Ok(_) => AuditItem::new(id, AuditItem::OK.to_owned(), reason.to_owned()),
                // The failure's own reason, not the caller's: a refused
                // reason may be megabytes long.
                Err(failure) => AuditItem::new(
                    id,
                    wire::failure_code_to_pb(failure.code)
                        .as_str_name()
                        .to_owned(),
                    failure.reason.clone(),
                ),
            })
            .collect();
        let record = AuditRecord {
            at: wall_clock(),
            actor: call.actor,
            request_id: call.request_id,
            method: call.method.into_owned(),
            peer: call.peer,
            items,
        };
        if let Err(e) = fleet.record_audit(record).wait().await {
            tracing::error!(error = %e, "an audit record could not be stored");
        }
    }
}
