//! The DescribeServers client: a connection, a thread and a runtime of
//! its own, one request at a time.

use dcv_broker::pb::servers_client::ServersClient;
use tonic::transport::Channel;

use super::*;

/// DescribeServers from a client of its own, on a thread and runtime of
/// its own (pinned with the broker), one request at a time.
pub struct Reader {
    runtime: tokio::runtime::Handle,
    client: ServersClient<Channel>,
    ids: Arc<Vec<String>>,
    _stop: std::sync::mpsc::SyncSender<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Describe {
    /// Every server, page after page of [`PAGE`].
    Pages,
    /// One server by id.
    Single,
}

/// Latency of one kind of request over one window, in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub requests: u64,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    /// Servers in one walk through every page (Pages only).
    pub walked: u64,
}

impl Reader {
    pub async fn start(addr: std::net::SocketAddr, agents: usize, pin_to: Option<usize>) -> Reader {
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
        std::thread::spawn(move || {
            if let Some(cpu) = pin_to {
                // This thread only: its id from /proc/thread-self.
                let me = std::fs::read_link("/proc/thread-self").unwrap();
                let tid = me.file_name().unwrap().to_str().unwrap().parse().unwrap();
                pin("", tid, cpu);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = handle_tx.send(runtime.handle().clone());
            runtime.block_on(async {
                let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
            });
        });
        let runtime = handle_rx.await.unwrap();
        let client = runtime
            .spawn(async move {
                let channel = endpoint(addr).connect().await.unwrap();
                ServersClient::new(channel).max_decoding_message_size(256 << 20)
            })
            .await
            .unwrap();
        Reader {
            runtime,
            client,
            ids: Arc::new((0..agents).map(demo::server_id).collect()),
            _stop: stop,
        }
    }

    pub async fn window(&self, kind: Describe, length: Duration) -> Latency {
        let mut client = self.client.clone();
        let ids = self.ids.clone();
        self.runtime
            .spawn(async move {
                let mut h = histogram();
                let mut out = Latency::default();
                let mut token = String::new();
                let (mut walked, mut walking) = (0u64, 0u64);
                let mut pick = 0x9e37_79b9_7f4a_7c15_u64;
                let end = Instant::now() + length;
                // Pages: at least one whole walk, which checks the fleet.
                while Instant::now() < end
                    || (kind == Describe::Pages && walked == 0 && out.errors < 10)
                {
                    let request = match kind {
                        Describe::Pages => pb::DescribeServersRequest {
                            next_token: token.clone(),
                            max_results: Some(PAGE),
                            ..Default::default()
                        },
                        Describe::Single => {
                            pick = pick
                                .wrapping_mul(6_364_136_223_846_793_005)
                                .wrapping_add(1_442_695_040_888_963_407);
                            let id = &ids[(pick >> 33) as usize % ids.len()];
                            pb::DescribeServersRequest {
                                server_ids: vec![id.clone()],
                                ..Default::default()
                            }
                        }
                    };
                    let sent = Instant::now();
                    match client.describe_servers(request).await {
                        Ok(reply) => {
                            let _ = h.record((sent.elapsed().as_micros() as u64).max(1));
                            let reply = reply.into_inner();
                            walking += reply.servers.len() as u64;
                            token = reply.next_token;
                            if token.is_empty() {
                                walked = walking;
                                walking = 0;
                            }
                        }
                        Err(_) => {
                            out.errors += 1;
                            token.clear();
                            walking = 0;
                        }
                    }
                }
                out.requests = h.len();
                out.p50 = h.value_at_quantile(0.5) as f64;
                out.p99 = h.value_at_quantile(0.99) as f64;
                out.walked = if kind == Describe::Pages { walked } else { 0 };
                out
            })
            .await
            .unwrap()
    }
}
