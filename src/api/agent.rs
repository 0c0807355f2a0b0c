//! The `Agent` gRPC service: registration, heartbeats and departure of the
//! agents that run beside each DCV server.

use std::pin::Pin;

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{Forwarder, RequestId, audit::AuditCall, forward::Leader};
use crate::cluster::{ClusterView, Role};
use crate::{
    fleet::{Fleet, InstructionKind, InstructionOutcome},
    pb::{self, agent_server::Agent},
    wire,
};

/// The `Agent` service over a fleet.
#[derive(Debug, Clone)]
pub struct AgentApi {
    fleet: Fleet,
    /// Sends writes to the leader when this replica follows one.
    forward: Forwarder,
    /// Turns true when the broker shuts down: instruction streams then end,
    /// so that agents reconnect elsewhere and the drain need not wait for
    /// streams that never end by themselves.
    stopping: watch::Receiver<bool>,
}

impl AgentApi {
    /// The service for `fleet`.
    pub fn new(fleet: Fleet, stopping: watch::Receiver<bool>) -> Self {
        AgentApi {
            fleet,
            stopping,
            forward: Forwarder::standalone(),
        }
    }

    /// The same service, forwarding writes as `forward` says.
    pub fn with_forwarder(mut self, forward: Forwarder) -> Self {
        self.forward = forward;
        self
    }

    /// A follower's instruction stream: the leader's, relayed, until this
    /// replica stops following that leader; then it ends UNAVAILABLE and
    /// the agent reconnects (to whichever replica, which forwards to the
    /// new leader).
    async fn relay_instructions(
        &self,
        leader: Leader,
        message: pb::StreamInstructionsRequest,
    ) -> Result<Response<<Self as Agent>::StreamInstructionsStream>, Status> {
        let server_id = message.server_id.clone();
        let mut upstream = leader
            .agent()
            .stream_instructions(leader.stream_request(message))
            .await
            .map_err(super::forward::passed_on)?
            .into_inner();
        tracing::debug!(server_id = %server_id, leader = leader.url(), "instruction stream relayed from the leader");
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    next = upstream.message() => next,
                    () = leader.left() => Err(Status::unavailable(
                        "this broker no longer follows the leader this stream came from; reconnect",
                    )),
                    _ = stopping.wait_for(|stop| *stop) => Ok(None),
                    // The agent hung up: so does the leader's stream.
                    () = tx.closed() => Ok(None),
                };
                match item {
                    Ok(Some(instruction)) => {
                        if tx.send(Ok(instruction)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    fn heartbeat_interval(&self) -> Option<prost_types::Duration> {
        prost_types::Duration::try_from(self.fleet.config().heartbeat_interval).ok()
    }
}

#[tonic::async_trait]
impl Agent for AgentApi {
    async fn register_server(
        &self,
        request: Request<pb::RegisterServerRequest>,
    ) -> Result<Response<pb::RegisterServerResponse>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            let forwarded = leader.request(request.into_inner());
            return leader
                .reply(leader.agent().register_server(forwarded))
                .await;
        }
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let audit = AuditCall::begin(&self.fleet, &request, "RegisterServer");
        let (id, description) = wire::registration_from_pb(request.into_inner())?;
        let new = self.fleet.register(&id, description).await?;
        let why = if new { "new server" } else { "known server" };
        AuditCall::finish(audit, &self.fleet, [(id.as_str(), &Ok(()), why)]).await;
        tracing::debug!(server_id = %id, new, "server registered");
        Ok(self.forward.stamped(pb::RegisterServerResponse {
            request_id,
            heartbeat_interval: self.heartbeat_interval(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            let forwarded = leader.request(request.into_inner());
            return leader.reply(leader.agent().heartbeat(forwarded)).await;
        }
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let (id, report) = wire::heartbeat_from_pb(request.into_inner())?;
        self.fleet.heartbeat(&id, report)?;
        tracing::debug!(server_id = %id, "heartbeat");
        Ok(self.forward.stamped(pb::HeartbeatResponse {
            request_id,
            heartbeat_interval: self.heartbeat_interval(),
        }))
    }

    async fn deregister_server(
        &self,
        request: Request<pb::DeregisterServerRequest>,
    ) -> Result<Response<pb::DeregisterServerResponse>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            let forwarded = leader.request(request.into_inner());
            return leader
                .reply(leader.agent().deregister_server(forwarded))
                .await;
        }
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let audit = AuditCall::begin(&self.fleet, &request, "DeregisterServer");
        let id = request.into_inner().server_id;
        let removed = self.fleet.deregister(&id).await?;
        let why = if removed {
            "removed"
        } else {
            "kept: closed by an operator"
        };
        AuditCall::finish(audit, &self.fleet, [(id.as_str(), &Ok(()), why)]).await;
        tracing::debug!(server_id = %id, removed, "server deregistered");
        Ok(self.forward.stamped(pb::DeregisterServerResponse {
            request_id,
            removed,
        }))
    }

    type StreamInstructionsStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamInstructionsResponse, Status>> + Send>>;

    async fn stream_instructions(
        &self,
        request: Request<pb::StreamInstructionsRequest>,
    ) -> Result<Response<Self::StreamInstructionsStream>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            return self.relay_instructions(leader, request.into_inner()).await;
        }
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let id = request.into_inner().server_id;
        let mut instructions = self.fleet.subscribe_instructions(&id)?;
        tracing::debug!(server_id = %id, "instruction stream opened");
        let mut stopping = self.stopping.clone();
        // A replica's stream is the leader's to feed: once this broker no
        // longer leads, the new leader holds the agent's instructions, so
        // the stream ends and the agent reconnects (to whichever replica;
        // a follower relays the new leader's). Standalone: never.
        let mut roles = self
            .forward
            .view()
            .filter(|view| view.is_clustered())
            .map(ClusterView::roles);
        // A small buffer: the agent's own pace throttles delivery, and what
        // it has not received is resent when it reconnects.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut deposed = false;
            loop {
                let instruction = tokio::select! {
                    next = instructions.recv() => next,
                    _ = stopping.wait_for(|stop| *stop) => None,
                    // The agent hung up: drop the subscription at once, so
                    // the broker sees the agent as gone.
                    () = tx.closed() => None,
                    () = no_longer_leader(roles.as_mut()) => {
                        deposed = true;
                        None
                    }
                };
                let Some(instruction) = instruction else {
                    if deposed {
                        let gone = Status::unavailable("this broker no longer leads; reconnect");
                        let _ = tx.send(Err(gone)).await;
                    }
                    break;
                };
                if tx
                    .send(Ok(wire::instruction_to_pb(instruction)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_instruction_result(
        &self,
        request: Request<pb::ReportInstructionResultRequest>,
    ) -> Result<Response<pb::ReportInstructionResultResponse>, Status> {
        if let Some(leader) = self.forward.route(&request)? {
            let forwarded = leader.request(request.into_inner());
            return leader
                .reply(leader.agent().report_instruction_result(forwarded))
                .await;
        }
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let r = request.into_inner();
        let kind = match pb::InstructionKind::try_from(r.kind) {
            Ok(pb::InstructionKind::CreateSession) => InstructionKind::Create,
            Ok(pb::InstructionKind::DeleteSession) => InstructionKind::Delete,
            Ok(pb::InstructionKind::UpdatePermissions) => InstructionKind::UpdatePermissions,
            Ok(pb::InstructionKind::GetScreenshot) => {
                let answer = if r.success {
                    Ok(wire::screenshot_images_from_pb(r.images)?)
                } else {
                    Err(r.failure_reason)
                };
                self.fleet.report_screenshot(
                    &r.server_id,
                    &r.session_id,
                    &r.instruction_id,
                    answer,
                )?;
                tracing::debug!(
                    server_id = %r.server_id,
                    instruction_id = %r.instruction_id,
                    "screenshot answer"
                );
                return Ok(self
                    .forward
                    .stamped(pb::ReportInstructionResultResponse { request_id }));
            }
            _ => {
                return Err(crate::fleet::FleetError::invalid(
                    "Kind",
                    format!("unknown or unspecified instruction kind {}", r.kind),
                )
                .into());
            }
        };
        let outcome = if r.success {
            InstructionOutcome::Done {
                ready: r.session_state == pb::SessionState::Ready as i32,
            }
        } else {
            InstructionOutcome::Failed(r.failure_reason)
        };
        self.fleet
            .report_instruction(&r.server_id, &r.session_id, kind, outcome)?;
        tracing::debug!(server_id = %r.server_id, session_id = %r.session_id, ?kind, "instruction result");
        Ok(self
            .forward
            .stamped(pb::ReportInstructionResultResponse { request_id }))
    }

    async fn validate_connection_token(
        &self,
        request: Request<pb::ValidateConnectionTokenRequest>,
    ) -> Result<Response<pb::ValidateConnectionTokenResponse>, Status> {
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let r = request.into_inner();
        let verdict = self.fleet.validate_connection_token(
            &r.server_id,
            &r.session_id,
            &r.connection_token,
        )?;
        Ok(Response::new(match verdict {
            Ok(user) => pb::ValidateConnectionTokenResponse {
                request_id,
                valid: true,
                user,
                reason: String::new(),
            },
            Err(reason) => pb::ValidateConnectionTokenResponse {
                request_id,
                valid: false,
                user: String::new(),
                reason,
            },
        }))
    }
}

/// Resolves once the role is no longer Leader; never without a role to
/// watch (a standalone broker).
async fn no_longer_leader(roles: Option<&mut tokio::sync::watch::Receiver<Role>>) {
    match roles {
        Some(roles) => {
            let watching = roles.wait_for(|role| *role != Role::Leader).await.is_ok();
            if !watching {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
