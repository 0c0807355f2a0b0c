//! The `Agent` gRPC service: registration, heartbeats and departure of the
//! agents that run beside each DCV server.

use tonic::{Request, Response, Status};

use super::{RequestId, convert};
use crate::{
    fleet::Fleet,
    pb::{self, agent_server::Agent},
};

/// The `Agent` service over a fleet.
#[derive(Debug, Clone)]
pub struct AgentApi {
    fleet: Fleet,
}

impl AgentApi {
    /// The service for `fleet`.
    pub fn new(fleet: Fleet) -> Self {
        AgentApi { fleet }
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
        let (id, description) = convert::registration_from_pb(request.into_inner())?;
        let new = self.fleet.register(&id, description)?;
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
        let (id, report) = convert::heartbeat_from_pb(request.into_inner())?;
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
        let id = request.into_inner().server_id;
        let removed = self.fleet.deregister(&id)?;
        tracing::debug!(server_id = %id, removed, "server deregistered");
        Ok(Response::new(pb::DeregisterServerResponse {
            request_id,
            removed,
        }))
    }
}
