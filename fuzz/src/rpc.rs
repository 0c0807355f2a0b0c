//! Every RPC of the three services (`proto/dcv/sessionmanager/v1/`), and
//! the `requests` target's input format: the first byte picks the RPC
//! (modulo their number), the rest is that RPC's request message, encoded
//! as protobuf.

/// One RPC of the contract, named by its service and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Servers/CloseServers`.
    CloseServers,
    /// `Servers/OpenServers`.
    OpenServers,
    /// `Servers/DescribeServers`.
    DescribeServers,
    /// `Sessions/CreateSessions`.
    CreateSessions,
    /// `Sessions/DescribeSessions`.
    DescribeSessions,
    /// `Sessions/DeleteSessions`.
    DeleteSessions,
    /// `Sessions/GetSessionConnectionData`.
    GetSessionConnectionData,
    /// `Sessions/UpdateSessionPermissions`.
    UpdateSessionPermissions,
    /// `Agent/RegisterServer`.
    RegisterServer,
    /// `Agent/Heartbeat`.
    Heartbeat,
    /// `Agent/DeregisterServer`.
    DeregisterServer,
    /// `Agent/StreamInstructions` (server streaming: the harness takes at
    /// most the first instruction).
    StreamInstructions,
    /// `Agent/ReportInstructionResult`.
    ReportInstructionResult,
    /// `Agent/ValidateConnectionToken`.
    ValidateConnectionToken,
    /// `Sessions/GetSessionScreenshots`.
    GetSessionScreenshots,
}

impl Rpc {
    /// Every RPC, in selector order. New RPCs go at the end, so that the
    /// committed corpus keeps meaning what it meant.
    pub const ALL: [Rpc; 15] = [
        Rpc::CloseServers,
        Rpc::OpenServers,
        Rpc::DescribeServers,
        Rpc::CreateSessions,
        Rpc::DescribeSessions,
        Rpc::DeleteSessions,
        Rpc::GetSessionConnectionData,
        Rpc::UpdateSessionPermissions,
        Rpc::RegisterServer,
        Rpc::Heartbeat,
        Rpc::DeregisterServer,
        Rpc::StreamInstructions,
        Rpc::ReportInstructionResult,
        Rpc::ValidateConnectionToken,
        Rpc::GetSessionScreenshots,
    ];

    /// The RPC a selector byte picks: every byte picks one.
    pub fn from_selector(byte: u8) -> Rpc {
        Rpc::ALL[usize::from(byte) % Rpc::ALL.len()]
    }

    /// The selector byte of this RPC.
    pub fn selector(self) -> u8 {
        let index = Rpc::ALL.iter().position(|r| *r == self).unwrap_or(0);
        u8::try_from(index).unwrap_or(0)
    }

    /// The method's name, for seed file names.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::CloseServers => "CloseServers",
            Rpc::OpenServers => "OpenServers",
            Rpc::DescribeServers => "DescribeServers",
            Rpc::CreateSessions => "CreateSessions",
            Rpc::DescribeSessions => "DescribeSessions",
            Rpc::DeleteSessions => "DeleteSessions",
            Rpc::GetSessionConnectionData => "GetSessionConnectionData",
            Rpc::UpdateSessionPermissions => "UpdateSessionPermissions",
            Rpc::RegisterServer => "RegisterServer",
            Rpc::Heartbeat => "Heartbeat",
            Rpc::DeregisterServer => "DeregisterServer",
            Rpc::StreamInstructions => "StreamInstructions",
            Rpc::ReportInstructionResult => "ReportInstructionResult",
            Rpc::ValidateConnectionToken => "ValidateConnectionToken",
            Rpc::GetSessionScreenshots => "GetSessionScreenshots",
        }
    }

    /// An input of the `requests` target: this RPC's selector, then
    /// `message` encoded.
    pub fn input(self, message: &impl prost::Message) -> Vec<u8> {
        let mut out = vec![self.selector()];
        out.extend(message.encode_to_vec());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Rpc;

    #[test]
    fn selectors_round_trip() {
        for rpc in Rpc::ALL {
            assert_eq!(Rpc::from_selector(rpc.selector()), rpc);
        }
    }
}
