//! A bare HTTP/2 client (h2) for what tonic's client will not do: hold a
//! request open without ever sending its message, or watch one connection
//! and see exactly when the server closes it (tonic's channel would
//! reconnect behind the test's back).

use std::net::SocketAddr;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::{net::TcpStream, task::JoinHandle};

/// One HTTP/2 connection: a handle to open streams on it, and the task
/// driving it, which ends when the connection closes.
pub struct RawH2 {
    pub send: SendRequest<Bytes>,
    pub connection: JoinHandle<Result<(), h2::Error>>,
    ping: h2::PingPong,
}

impl RawH2 {
    /// Connects and finishes the HTTP/2 handshake.
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let ping = connection.ping_pong().expect("the first ping_pong");
        let connection = tokio::spawn(connection);
        RawH2 {
            send,
            connection,
            ping,
        }
    }

    /// Starts a gRPC call to `path` and sends nothing more: the server
    /// waits for its message. Returns once the server has seen the request
    /// (a PING sent after it has come back: HTTP/2 frames are handled in
    /// order).
    pub async fn hold_open(&mut self, path: &str) -> h2::SendStream<Bytes> {
        let (_reply, stream) = self
            .send
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(grpc_request(path), false)
            .unwrap();
        self.ping.ping(h2::Ping::opaque()).await.unwrap();
        stream
    }

    /// A server-streaming gRPC call to `path` with an empty message; returns
    /// once the reply's headers are in, with the reply still open.
    pub async fn open_stream(&mut self, path: &str) -> h2::RecvStream {
        let (reply, mut stream) = self
            .send
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(grpc_request(path), false)
            .unwrap();
        // The 5-byte gRPC frame header of an empty message.
        stream
            .send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        reply.await.unwrap().into_body()
    }

    /// A complete gRPC call to `path` with an empty message; waits for the
    /// whole reply, trailers included, and returns its `grpc-status`.
    pub async fn call(&mut self, path: &str) -> Option<String> {
        let mut body = self.open_stream(path).await;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap()?;
        trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}
