//! The `Servers` gRPC service: CloseServers, OpenServers, DescribeServers,
//! DescribeServerHistory, WatchServers, DrainServers, DescribeDrains.

use tonic::{Request, Response, Status};

use tokio::sync::watch;

use super::{Forwarder, RequestId, audit::AuditCall, error::truncated, idempotency, watch_stream};
use crate::{
    fleet::{self, CloseItem, DescribeQuery, Fleet, OpenItem, query},
    pb::{self, servers_server::Servers},
    wire,
};

/// The longest Reason a failed CloseServers item echoes back, in bytes
/// (default 256): enough to recognise it, while an invalid one may be
/// megabytes that the caller already has.
pub const MAX_ECHOED_REASON_BYTES: usize = 256;

/// A failed item's Reason as echoed, and its FailureReason, which says when
/// the echo is cut short.
fn echoed(mut reason: String, failure_reason: String) -> (String, String) {
    let len = reason.len();
    if len <= MAX_ECHOED_REASON_BYTES {
        return (reason, failure_reason);
    }
    reason.truncate(truncated(&reason, MAX_ECHOED_REASON_BYTES).len());
    let note = format!("The Reason echoed here is truncated from {len} bytes.");
    let failure_reason = if failure_reason.is_empty() {
        note
    } else {
        format!("{failure_reason} {note}")
    };
    (reason, failure_reason)
}

/// The `Servers` service over a fleet.
#[derive(Debug, Clone)]
pub struct ServersApi {
    fleet: Fleet,
    /// Sends writes to the leader when this replica follows one.
    forward: Forwarder,
    /// Turns true when the broker shuts down: watch streams then end, so
    /// that the drain need not wait for streams that never end by
    /// themselves. `None`: never.
    stopping: Option<watch::Receiver<bool>>,
}

impl ServersApi {
    /// The service for `fleet`.
    pub fn new(fleet: Fleet) -> Self {
        ServersApi {
            fleet,
            forward: Forwarder::standalone(),
            stopping: None,
        }
    }

    /// The same service, its watch streams ending when `stopping` turns
    /// true.
    pub fn with_stopping(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// The same service, forwarding writes as `forward` says.
    pub fn with_forwarder(mut self, forward: Forwarder) -> Self {
        self.forward = forward;
        self
    }
}

#[tonic::async_trait]
impl Servers for ServersApi {
    type WatchServersStream = watch_stream::WatchServersStream;

    async fn watch_servers(
        &self,
        request: Request<pb::WatchServersRequest>,
    ) -> Result<Response<Self::WatchServersStream>, Status> {
        let r = request.into_inner();
        let asked = watch_stream::WatchRequest::check(
            &self.fleet,
            r.filters,
            r.from_sequence,
            r.epoch,
            r.progress_interval,
        )?;
        let stream = watch_stream::open(asked, self.stopping.clone(), |filters, resume| {
            self.fleet.watch_servers(filters, resume)
        })?;
        Ok(Response::new(stream))
    }

    async fn close_servers(
        &self,
        mut request: Request<pb::CloseServersRequest>,
    ) -> Result<Response<pb::CloseServersResponse>, Status> {
        idempotency::mutating!(self, request, servers, close_servers, close_servers_here)
    }

    async fn open_servers(
        &self,
        mut request: Request<pb::OpenServersRequest>,
    ) -> Result<Response<pb::OpenServersResponse>, Status> {
        idempotency::mutating!(self, request, servers, open_servers, open_servers_here)
    }

    async fn describe_servers(
        &self,
        request: Request<pb::DescribeServersRequest>,
    ) -> Result<Response<pb::DescribeServersResponse>, Status> {
        let request_id = RequestId::of(&request);
        let r = request.into_inner();
        fleet::check_lengths(&[
            ("ServerIds", r.server_ids.len(), query::MAX_DESCRIBE_IDS),
            ("Filters", r.filters.len(), query::MAX_FILTERS),
        ])?;
        let query = DescribeQuery {
            server_ids: r.server_ids,
            next_token: r.next_token,
            max_results: r.max_results,
            filters: r.filters.into_iter().map(|f| (f.key, f.value)).collect(),
        };
        let mut servers = Vec::new();
        let next_token = self
            .fleet
            .describe_servers(&query, |view| servers.push(wire::server_to_pb(view)))?;
        tracing::debug!(
            servers = servers.len(),
            more = next_token.is_some(),
            "servers described"
        );
        Ok(Response::new(pb::DescribeServersResponse {
            request_id,
            servers,
            next_token: next_token.unwrap_or_default(),
        }))
    }

    async fn drain_servers(
        &self,
        mut request: Request<pb::DrainServersRequest>,
    ) -> Result<Response<pb::DrainServersResponse>, Status> {
        idempotency::mutating!(self, request, servers, drain_servers, drain_servers_here)
    }

    async fn describe_drains(
        &self,
        request: Request<pb::DescribeDrainsRequest>,
    ) -> Result<Response<pb::DescribeDrainsResponse>, Status> {
        let request_id = RequestId::of(&request);
        let r = request.into_inner();
        fleet::check_lengths(&[("DrainIds", r.drain_ids.len(), query::MAX_DESCRIBE_IDS)])?;
        let page = self.fleet.describe_drains(&fleet::DrainQuery {
            drain_ids: r.drain_ids,
            next_token: r.next_token,
            max_results: r.max_results,
        })?;
        Ok(Response::new(pb::DescribeDrainsResponse {
            request_id,
            drains: page.drains.into_iter().map(wire::drain_to_pb).collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn describe_server_history(
        &self,
        request: Request<pb::DescribeServerHistoryRequest>,
    ) -> Result<Response<pb::DescribeServerHistoryResponse>, Status> {
        let request_id = RequestId::of(&request);
        let query = wire::history_query_from_pb(request.into_inner())?;
        let page = self.fleet.describe_history(query).await?;
        tracing::debug!(
            records = page.records.len(),
            more = page.next_token.is_some(),
            "history described"
        );
        Ok(Response::new(pb::DescribeServerHistoryResponse {
            request_id,
            records: page
                .records
                .into_iter()
                .map(wire::history_record_to_pb)
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }
}

impl ServersApi {
    /// CloseServers, served here (this broker leads or stands alone).
    async fn close_servers_here(
        &self,
        request: Request<pb::CloseServersRequest>,
    ) -> Result<Response<pb::CloseServersResponse>, Status> {
        let request_id = RequestId::of(&request);
        let actor = super::auth::actor(&request);
        let dry_run = request.get_ref().dry_run;
        // A dry run changes nothing: nothing to audit.
        let audit = (!dry_run)
            .then(|| AuditCall::begin(&self.fleet, &request, "CloseServers"))
            .flatten();
        let pb::CloseServersRequest {
            servers,
            capacity_tag_key,
            ..
        } = request.into_inner();
        // The size first: nothing is built per item of a batch too big.
        fleet::validate_batch_size("Servers", servers.len())?;
        // The request's strings move into the items and back into the
        // response: no copy per item. An expiry as given is kept apart, for
        // the echo of a failed item, only for the items that have one.
        let mut expiries = Vec::new();
        let items: Vec<CloseItem> = servers
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let expiry = wire::expiry_from_pb(s.expires_at, s.expires_in);
                if s.expires_at.is_some() || s.expires_in.is_some() {
                    expiries.push((i, s.expires_at, s.expires_in));
                }
                CloseItem {
                    server_id: s.server_id,
                    force: s.force.unwrap_or(false),
                    reason: s.reason,
                    hold_name: s.hold_name.unwrap_or_default(),
                    expiry,
                    expected_version: s.expected_state_version,
                    override_floor: s.override_capacity_floor.unwrap_or(false),
                }
            })
            .collect();
        let mut response = pb::CloseServersResponse {
            request_id,
            ..Default::default()
        };
        let results = if dry_run {
            let (results, radius) = self
                .fleet
                .close_servers_dry_run(&items, &capacity_tag_key)?;
            response.dry_run = Some(true);
            response.blast_radius = Some(wire::blast_radius_to_pb(radius));
            results
        } else {
            let results = self.fleet.close_servers(&items, &actor).await?;
            let audited = items.iter().zip(&results);
            AuditCall::finish(
                audit,
                &self.fleet,
                audited.map(|(i, r)| (i.server_id.as_str(), r, i.reason.as_str())),
            )
            .await;
            results
        };
        let mut expiries = expiries.into_iter().peekable();
        for (i, (item, result)) in items.into_iter().zip(results).enumerate() {
            let (expires_at, expires_in) = match expiries.next_if(|(at, ..)| *at == i) {
                Some((_, at, within)) => (at, within),
                None => (None, None),
            };
            match result {
                Ok(()) => response
                    .successful_list
                    .push(pb::CloseServerSuccessfulResponse {
                        server_id: item.server_id,
                    }),
                Err(failure) => {
                    let (reason, failure_reason) = echoed(item.reason, failure.reason);
                    // Force is echoed explicitly, so JSON shows what was
                    // applied; the fields beyond DCV only when given, so
                    // that a DCV client sees DCV's shape.
                    let data = pb::CloseServerRequestData {
                        server_id: item.server_id,
                        force: Some(item.force),
                        reason,
                        hold_name: (!item.hold_name.is_empty()).then_some(item.hold_name),
                        expires_at,
                        expires_in,
                        expected_state_version: item.expected_version,
                        override_capacity_floor: item.override_floor.then_some(true),
                    };
                    response
                        .unsuccessful_list
                        .push(pb::CloseServerUnsuccessfulResponse {
                            close_server_request_data: Some(data),
                            failure_code: wire::failure_code_to_pb(failure.code) as i32,
                            failure_reason,
                        });
                }
            }
        }
        tracing::debug!(
            succeeded = response.successful_list.len(),
            failed = response.unsuccessful_list.len(),
            dry_run,
            "servers closed"
        );
        Ok(self.forward.stamped(response))
    }

    /// DrainServers, served here.
    async fn drain_servers_here(
        &self,
        request: Request<pb::DrainServersRequest>,
    ) -> Result<Response<pb::DrainServersResponse>, Status> {
        let request_id = RequestId::of(&request);
        let actor = super::auth::actor(&request);
        let audit = AuditCall::begin(&self.fleet, &request, "DrainServers");
        let r = request.into_inner();
        fleet::validate_batch_size("Servers", r.servers.len())?;
        let drain = wire::drain_request_from_pb(r)?;
        let outcome = self.fleet.drain_servers(&drain, &actor).await?;
        // Each item's audited reason names the drain, so that a server's
        // history leads to it.
        let why = match &outcome.drain_id {
            Some(id) if drain.reason.is_empty() => format!("drain {id}"),
            Some(id) => format!("drain {id}: {}", drain.reason),
            None => String::new(),
        };
        let audited = drain.server_ids.iter().zip(&outcome.results);
        AuditCall::finish(
            audit,
            &self.fleet,
            audited.map(|(id, r)| (id.as_str(), r, why.as_str())),
        )
        .await;
        let mut response = pb::DrainServersResponse {
            request_id,
            drain_id: outcome.drain_id.unwrap_or_default(),
            ..Default::default()
        };
        for (server_id, result) in drain.server_ids.into_iter().zip(outcome.results) {
            match result {
                Ok(()) => response
                    .successful_list
                    .push(pb::DrainServerSuccessfulResponse { server_id }),
                Err(failure) => {
                    response
                        .unsuccessful_list
                        .push(pb::DrainServerUnsuccessfulResponse {
                            drain_server_request_data: Some(pb::DrainServerRequestData {
                                server_id,
                            }),
                            failure_code: wire::failure_code_to_pb(failure.code) as i32,
                            failure_reason: failure.reason,
                        })
                }
            }
        }
        tracing::debug!(
            drain = %response.drain_id,
            succeeded = response.successful_list.len(),
            failed = response.unsuccessful_list.len(),
            "servers drained"
        );
        Ok(self.forward.stamped(response))
    }

    /// OpenServers, served here.
    async fn open_servers_here(
        &self,
        request: Request<pb::OpenServersRequest>,
    ) -> Result<Response<pb::OpenServersResponse>, Status> {
        let request_id = RequestId::of(&request);
        let dry_run = request.get_ref().dry_run;
        let audit = (!dry_run)
            .then(|| AuditCall::begin(&self.fleet, &request, "OpenServers"))
            .flatten();
        let pb::OpenServersRequest {
            servers,
            capacity_tag_key,
            ..
        } = request.into_inner();
        fleet::validate_batch_size("Servers", servers.len())?;
        let items: Vec<OpenItem> = servers
            .into_iter()
            .map(|s| OpenItem {
                server_id: s.server_id,
                hold_name: s.hold_name.unwrap_or_default(),
                expected_version: s.expected_state_version,
            })
            .collect();
        let mut response = pb::OpenServersResponse {
            request_id,
            ..Default::default()
        };
        let results = if dry_run {
            let (results, radius) = self.fleet.open_servers_dry_run(&items, &capacity_tag_key)?;
            response.dry_run = Some(true);
            response.blast_radius = Some(wire::blast_radius_to_pb(radius));
            results
        } else {
            let results = self.fleet.open_servers(&items).await?;
            let audited = items.iter().zip(&results);
            AuditCall::finish(
                audit,
                &self.fleet,
                audited.map(|(i, r)| (i.server_id.as_str(), r, i.hold_name.as_str())),
            )
            .await;
            results
        };
        for (item, result) in items.into_iter().zip(results) {
            match result {
                Ok(()) => response
                    .successful_list
                    .push(pb::OpenServerSuccessfulResponse {
                        server_id: item.server_id,
                    }),
                Err(failure) => {
                    response
                        .unsuccessful_list
                        .push(pb::OpenServerUnsuccessfulResponse {
                            open_server_request_data: Some(pb::OpenServerRequestData {
                                server_id: item.server_id,
                                hold_name: (!item.hold_name.is_empty()).then_some(item.hold_name),
                                expected_state_version: item.expected_version,
                            }),
                            failure_code: wire::failure_code_to_pb(failure.code) as i32,
                            failure_reason: failure.reason,
                        })
                }
            }
        }
        tracing::debug!(
            succeeded = response.successful_list.len(),
            failed = response.unsuccessful_list.len(),
            dry_run,
            "servers opened"
        );
        Ok(self.forward.stamped(response))
    }
}
