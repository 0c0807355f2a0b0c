//! The `Agent` gRPC service: registration, heartbeats and departure of the
//! agents that run beside each DCV server.

use std::pin::Pin;

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::RequestId;
use crate::{
    fleet::{Fleet, InstructionKind, InstructionOutcome},
    pb::{self, agent_server::Agent},
    wire,
};

/// The `Agent` service over a fleet.
#[derive(Debug, Clone)]
pub struct AgentApi {
    fleet: Fleet,
    /// Turns true when the broker shuts down: instruction streams then end,
    /// so that agents reconnect elsewhere and the drain need not wait for
    /// streams that never end by themselves.
    stopping: watch::Receiver<bool>,
}

impl AgentApi {
    /// The service for `fleet`.
    pub fn new(fleet: Fleet, stopping: watch::Receiver<bool>) -> Self {
        AgentApi { fleet, stopping }
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
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let (id, description) = wire::registration_from_pb(request.into_inner())?;
        let new = self.fleet.register(&id, description).await?;
        tracing::debug!(server_id = %id, new, "server registered");
        Ok(Response::new(pb::RegisterServerResponse {
            request_id,
            heartbeat_interval: self.heartbeat_interval(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let (id, report) = wire::heartbeat_from_pb(request.into_inner())?;
        self.fleet.heartbeat(&id, report)?;
        tracing::debug!(server_id = %id, "heartbeat");
        Ok(Response::new(pb::HeartbeatResponse {
            request_id,
            heartbeat_interval: self.heartbeat_interval(),
        }))
    }

    async fn deregister_server(
        &self,
        request: Request<pb::DeregisterServerRequest>,
    ) -> Result<Response<pb::DeregisterServerResponse>, Status> {
        let request_id = RequestId::of(&request);
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let id = request.into_inner().server_id;
        let removed = self.fleet.deregister(&id).await?;
        tracing::debug!(server_id = %id, removed, "server deregistered");
        Ok(Response::new(pb::DeregisterServerResponse {
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
        super::auth::check_agent(&request, &request.get_ref().server_id)?;
        let id = request.into_inner().server_id;
        let mut instructions = self.fleet.subscribe_instructions(&id)?;
        tracing::debug!(server_id = %id, "instruction stream opened");
        let mut stopping = self.stopping.clone();
        // A small buffer: the agent's own pace throttles delivery, and what
        // it has not received is resent when it reconnects.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let instruction = tokio::select! {
                    next = instructions.recv() => next,
                    _ = stopping.wait_for(|stop| *stop) => None,
                    // The agent hung up: drop the subscription at once, so
                    // the broker sees the agent as gone.
                    () = tx.closed() => None,
                };
                let Some(instruction) = instruction else {
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
                return Ok(Response::new(pb::ReportInstructionResultResponse {
                    request_id,
                }));
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
        Ok(Response::new(pb::ReportInstructionResultResponse {
            request_id,
        }))
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
