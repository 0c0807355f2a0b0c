//! The `Sessions` gRPC service: CreateSessions, DescribeSessions,
//! DeleteSessions, GetSessionConnectionData, UpdateSessionPermissions,
//! GetSessionScreenshots, WatchSessions.

use tonic::{Request, Response, Status};

use tokio::sync::watch;

use super::{Forwarder, RequestId, audit::AuditCall, idempotency, watch_stream};
use crate::{
    fleet::{
        self, DeleteItem, Fleet, PermissionsItem, SessionQuery, query,
        sessions::screenshots::MAX_SCREENSHOT_ITEMS,
    },
    pb::{self, sessions_server::Sessions},
    wire,
};

/// The `Sessions` service over a fleet.
#[derive(Debug, Clone)]
pub struct SessionsApi {
    fleet: Fleet,
    /// Sends writes to the leader when this replica follows one.
    forward: Forwarder,
    /// Turns true when the broker shuts down: watch streams then end.
    stopping: Option<watch::Receiver<bool>>,
}

impl SessionsApi {
    /// The service for `fleet`.
    pub fn new(fleet: Fleet) -> Self {
        SessionsApi {
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
impl Sessions for SessionsApi {
    type WatchSessionsStream = watch_stream::WatchSessionsStream;

    async fn watch_sessions(
        &self,
        request: Request<pb::WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        let r = request.into_inner();
        let asked = watch_stream::WatchRequest::check(
            &self.fleet,
            r.filters,
            r.from_sequence,
            r.epoch,
            r.progress_interval,
        )?;
        let stream = watch_stream::open(asked, self.stopping.clone(), |filters, resume| {
            self.fleet.watch_sessions(filters, resume)
        })?;
        Ok(Response::new(stream))
    }

    async fn create_sessions(
        &self,
        mut request: Request<pb::CreateSessionsRequest>,
    ) -> Result<Response<pb::CreateSessionsResponse>, Status> {
        idempotency::mutating!(
            self,
            request,
            sessions,
            create_sessions,
            create_sessions_here
        )
    }

    async fn describe_sessions(
        &self,
        request: Request<pb::DescribeSessionsRequest>,
    ) -> Result<Response<pb::DescribeSessionsResponse>, Status> {
        let request_id = RequestId::of(&request);
        let r = request.into_inner();
        fleet::check_lengths(&[
            ("SessionIds", r.session_ids.len(), query::MAX_DESCRIBE_IDS),
            ("Filters", r.filters.len(), query::MAX_FILTERS),
        ])?;
        let query = SessionQuery {
            session_ids: r.session_ids,
            filters: r.filters.into_iter().map(|f| (f.key, f.value)).collect(),
            max_results: r.max_results,
            next_token: r.next_token,
        };
        let mut sessions = Vec::new();
        let next_token = self
            .fleet
            .describe_sessions(&query, |view| sessions.push(wire::session_to_pb(view)))?;
        tracing::debug!(sessions = sessions.len(), "sessions described");
        Ok(Response::new(pb::DescribeSessionsResponse {
            request_id,
            sessions,
            next_token: next_token.unwrap_or_default(),
        }))
    }

    async fn delete_sessions(
        &self,
        mut request: Request<pb::DeleteSessionsRequest>,
    ) -> Result<Response<pb::DeleteSessionsResponse>, Status> {
        idempotency::mutating!(
            self,
            request,
            sessions,
            delete_sessions,
            delete_sessions_here
        )
    }

    async fn get_session_connection_data(
        &self,
        request: Request<pb::GetSessionConnectionDataRequest>,
    ) -> Result<Response<pb::GetSessionConnectionDataResponse>, Status> {
        let request_id = RequestId::of(&request);
        let r = request.into_inner();
        let mut session = None;
        let connection_token = self.fleet.connection_data(&r.session_id, &r.user, |view| {
            session = Some(wire::session_to_pb(view));
        })?;
        tracing::debug!(session_id = %r.session_id, user = %r.user, "connection token issued");
        Ok(Response::new(pb::GetSessionConnectionDataResponse {
            request_id,
            session,
            connection_token,
        }))
    }

    async fn update_session_permissions(
        &self,
        mut request: Request<pb::UpdateSessionPermissionsRequest>,
    ) -> Result<Response<pb::UpdateSessionPermissionsResponse>, Status> {
        idempotency::mutating!(
            self,
            request,
            sessions,
            update_session_permissions,
            update_session_permissions_here
        )
    }

    async fn get_session_screenshots(
        &self,
        request: Request<pb::GetSessionScreenshotsRequest>,
    ) -> Result<Response<pb::GetSessionScreenshotsResponse>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            let forwarded = leader.request(request.into_inner());
            return leader
                .reply(leader.sessions().get_session_screenshots(forwarded))
                .await;
        }
        let request_id = RequestId::of(&request);
        let items = request.into_inner().sessions;
        fleet::validate_batch_size_up_to("Sessions", items.len(), MAX_SCREENSHOT_ITEMS)?;
        let domain: Vec<_> = items.iter().map(wire::screenshot_item_from_pb).collect();
        let results = self.fleet.get_session_screenshots(&domain).await?;
        let mut response = pb::GetSessionScreenshotsResponse {
            request_id,
            ..Default::default()
        };
        for (data, result) in items.into_iter().zip(results) {
            match result {
                Ok(images) => {
                    response
                        .successful_list
                        .push(pb::GetSessionScreenshotSuccessfulResponse {
                            session_screenshot: Some(pb::SessionScreenshot {
                                session_id: data.session_id,
                                images: images
                                    .into_iter()
                                    .map(wire::screenshot_image_to_pb)
                                    .collect(),
                            }),
                        })
                }
                Err(failure) => {
                    response
                        .unsuccessful_list
                        .push(pb::GetSessionScreenshotUnsuccessfulResponse {
                            get_session_screenshot_request_data: Some(data),
                            failure_code: wire::failure_code_to_pb(failure.code) as i32,
                            failure_reason: failure.reason,
                        })
                }
            }
        }
        tracing::debug!(
            succeeded = response.successful_list.len(),
            failed = response.unsuccessful_list.len(),
            "screenshots taken"
        );
        Ok(self.forward.stamped(response))
    }
}

impl SessionsApi {
    /// CreateSessions, served here (this broker leads or stands alone).
    async fn create_sessions_here(
        &self,
        request: Request<pb::CreateSessionsRequest>,
    ) -> Result<Response<pb::CreateSessionsResponse>, Status> {
        let request_id = RequestId::of(&request);
        let audit = AuditCall::begin(&self.fleet, &request, "CreateSessions");
        let items = request.into_inner().sessions;
        // The size first: nothing is copied per item of a batch too big.
        fleet::validate_batch_size("Sessions", items.len())?;
        let specs: Vec<_> = items.iter().map(wire::create_spec_from_pb).collect();
        let mut created = Vec::new();
        let results = self
            .fleet
            .create_sessions(&specs, |index, view| {
                created.push((index, wire::session_to_pb(view)));
            })
            .await?;
        if audit.is_some() {
            // A created session is audited under the id it was given; a
            // failed item has none.
            let mut ids = vec![""; results.len()];
            for (index, session) in &created {
                if let Some(id) = ids.get_mut(*index) {
                    *id = session.id.as_str();
                }
            }
            let audited = ids.iter().zip(&results);
            AuditCall::finish(audit, &self.fleet, audited.map(|(id, r)| (*id, r, ""))).await;
        }
        let mut response = pb::CreateSessionsResponse {
            request_id,
            ..Default::default()
        };
        response.successful_list = created.into_iter().map(|(_, s)| s).collect();
        for (data, result) in items.into_iter().zip(results) {
            if let Err(failure) = result {
                response
                    .unsuccessful_list
                    .push(pb::CreateSessionUnsuccessfulResponse {
                        create_session_request_data: Some(data),
                        failure_code: wire::failure_code_to_pb(failure.code) as i32,
                        failure_reason: failure.reason,
                    });
            }
        }
        tracing::debug!(
            succeeded = response.successful_list.len(),
            failed = response.unsuccessful_list.len(),
            "sessions created"
        );
        Ok(self.forward.stamped(response))
    }

    /// DeleteSessions, served here (this broker leads or stands alone).
    async fn delete_sessions_here(
        &self,
        request: Request<pb::DeleteSessionsRequest>,
    ) -> Result<Response<pb::DeleteSessionsResponse>, Status> {
        let request_id = RequestId::of(&request);
        let dry_run = request.get_ref().dry_run;
        // A dry run changes nothing: nothing to audit.
        let audit = (!dry_run)
            .then(|| AuditCall::begin(&self.fleet, &request, "DeleteSessions"))
            .flatten();
        let pb::DeleteSessionsRequest {
            sessions: items,
            capacity_tag_key,
            ..
        } = request.into_inner();
        fleet::validate_batch_size("Sessions", items.len())?;
        let domain: Vec<DeleteItem> = items
            .iter()
            .map(|d| DeleteItem {
                session_id: d.session_id.clone(),
                owner: d.owner.clone(),
                force: d.force.unwrap_or(false),
            })
            .collect();
        let mut blast_radius = None;
        let results = if dry_run {
            let (results, radius) = self
                .fleet
                .delete_sessions_dry_run(&domain, &capacity_tag_key)?;
            blast_radius = Some(wire::blast_radius_to_pb(radius));
            results
        } else {
            let results = self.fleet.delete_sessions(&domain).await?;
            let audited = domain.iter().zip(&results);
            AuditCall::finish(
                audit,
                &self.fleet,
                audited.map(|(d, r)| (d.session_id.as_str(), r, "")),
            )
            .await;
            results
        };
        let mut response = pb::DeleteSessionsResponse {
            request_id,
            dry_run: dry_run.then_some(true),
            blast_radius,
            ..Default::default()
        };
        for (data, result) in items.into_iter().zip(results) {
            match result {
                Ok(state) => response
                    .successful_list
                    .push(pb::DeleteSessionSuccessfulResponse {
                        session_id: data.session_id,
                        state: wire::session_state_to_pb(state) as i32,
                    }),
                Err(failure) => {
                    response
                        .unsuccessful_list
                        .push(pb::DeleteSessionUnsuccessfulResponse {
                            session_id: data.session_id,
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
            "sessions deleted"
        );
        Ok(self.forward.stamped(response))
    }

    /// UpdateSessionPermissions, served here (this broker leads or stands alone).
    async fn update_session_permissions_here(
        &self,
        request: Request<pb::UpdateSessionPermissionsRequest>,
    ) -> Result<Response<pb::UpdateSessionPermissionsResponse>, Status> {
        let request_id = RequestId::of(&request);
        let audit = AuditCall::begin(&self.fleet, &request, "UpdateSessionPermissions");
        let items = request.into_inner().sessions;
        fleet::validate_batch_size("Sessions", items.len())?;
        let domain: Vec<PermissionsItem> = items
            .iter()
            .map(|d| PermissionsItem {
                session_id: d.session_id.clone(),
                owner: d.owner.clone(),
                permissions_file: d.permissions_file.clone(),
            })
            .collect();
        let results = self.fleet.update_session_permissions(&domain).await?;
        let audited = domain.iter().zip(&results);
        AuditCall::finish(
            audit,
            &self.fleet,
            audited.map(|(d, r)| (d.session_id.as_str(), r, "")),
        )
        .await;
        let mut response = pb::UpdateSessionPermissionsResponse {
            request_id,
            ..Default::default()
        };
        for (data, result) in items.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    response
                        .successful_list
                        .push(pb::UpdateSessionPermissionsSuccessfulResponse {
                            session_id: data.session_id,
                        })
                }
                Err(failure) => response.unsuccessful_list.push(
                    pb::UpdateSessionPermissionsUnsuccessfulResponse {
                        session_id: data.session_id,
                        failure_code: wire::failure_code_to_pb(failure.code) as i32,
                        failure_reason: failure.reason,
                    },
                ),
            }
        }
        Ok(self.forward.stamped(response))
    }
}
