//! Connections: how many the broker holds at once, how long one that does
//! nothing may stay, the file-descriptor limit they live under, and the end
//! of streaming replies when a drain starts.
//!
//! Every accepted TCP connection takes a slot ([`Connections::admit`]);
//! beyond [`ConnectionLimits::max_connections`] a new connection is closed
//! at once, so a flood of idle sockets can never use up the process's file
//! descriptors and lock real clients out for good. Idle connections are
//! reaped so that the slots come back:
//! - a connection that has not started its first request within
//!   [`ConnectionLimits::first_request_timeout`] (a port scan, a client
//!   that never sends the HTTP/2 preface, a TLS session silent after its
//!   handshake) is closed;
//! - a connection with no open request for
//!   [`ConnectionLimits::idle_timeout`] is closed. HTTP/2 keepalive pings
//!   do not count: they prove the peer alive, not that it needs the slot.
//!
//! The reaping runs inside each connection's own reads ([`Tracked`]), with
//! no task of its own: hyper always has a read pending on a connection, so
//! the timer there fires on time. Which requests a connection has open is
//! counted by [`ConnectionLayer`], which finds the connection by its peer
//! address. The same layer ends streaming replies (Health/Watch, agents'
//! instruction streams, reflection) with `UNAVAILABLE` when the drain
//! starts ([`Connections::start_drain`]): they never end by themselves and
//! would otherwise hold every shutdown to the drain deadline.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::{Instant, Sleep},
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;

mod reply;

pub use self::reply::{ConnectionLayer, ConnectionPolicy, ConnectionService, ReplyWatch};

/// The default cap on open connections. Each holds a file descriptor and
/// some memory (a few tens of KiB with HTTP/2 buffers); ten thousand is far
/// more than a fleet's API clients and agents need, and the binary lowers
/// it further to fit the file-descriptor limit ([`fit_to_fd_limit`]).
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long a new connection has to start its first request. A real
/// client connects to make a call and makes it within milliseconds; ten
/// seconds also covers a slow network. Short, because until then the
/// connection is anonymous: this is what keeps idle sockets from holding
/// every slot.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may stay open with no request in progress. gRPC
/// clients reconnect by themselves when they next call; five minutes spares
/// clients that call every minute or so the reconnection, and frees the
/// slots of those that went away without closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// File descriptors kept for everything that is not a client connection:
/// the listener, the store (database, WAL, shared memory), the admin
/// socket, the certificate files on reload, the runtime's own.
pub const RESERVED_FDS: u64 = 64;

/// The window of [`Occurrences`]: events are counted per minute.
const OCCURRENCE_WINDOW: Duration = Duration::from_secs(60);

/// The bytes a connection must have sent before the first request can
/// have started: HTTP/2's client preface is 24 bytes (and an HTTP/1
/// request line is longer). Used only to tell, in the log, a connection
/// that sent nothing from one that stopped half-way.
const PREFACE_LEN: u64 = 24;

/// How many connections the broker holds and how long idle ones may stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The most connections open at once (TLS handshakes included); one
    /// more is closed as soon as it is accepted. Default
    /// [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long a connection has to start its first request (`None`: no
    /// limit). Default [`FIRST_REQUEST_TIMEOUT`].
    pub first_request_timeout: Option<Duration>,
    /// How long a connection may stay with no request in progress (`None`:
    /// no limit). Default [`IDLE_TIMEOUT`].
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: MAX_CONNECTIONS,
            first_request_timeout: Some(FIRST_REQUEST_TIMEOUT),
            idle_timeout: Some(IDLE_TIMEOUT),
        }
    }
}

impl ConnectionLimits {
    /// No cap and no reaping: for tests on a paused clock, where idle
    /// timers would fire as soon as a test advances time.
    pub fn unlimited() -> Self {
        ConnectionLimits {
            max_connections: usize::MAX,
            first_request_timeout: None,
            idle_timeout: None,
        }
    }
}

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit
/// where the system allows it, logs both, and lowers `limits`'s connection
/// cap to fit under it with [`RESERVED_FDS`] to spare. With the cap below
/// the limit, accepting never fails for want of a descriptor: a connection
/// over the cap is accepted and closed, so the kernel's backlog keeps
/// moving and a real client gets in as soon as a slot is free.
pub fn fit_to_fd_limit(limits: ConnectionLimits) -> ConnectionLimits {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE);
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            match before {
                Ok((soft, _)) => soft,
                Err(_) => return limits,
            }
        }
    };
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(soft, |(_, hard)| hard);
    let room = usize::try_from(soft.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    let max_connections = limits.max_connections.min(room.max(1));
    let fitted = ConnectionLimits {
        max_connections,
        ..limits
    };
    tracing::info!(
        soft_before = before.map(|(soft, _)| soft).ok(),
        soft,
        hard,
        max_connections,
        "file descriptor limit (RLIMIT_NOFILE)"
    );
    if max_connections < limits.max_connections && limits.max_connections != usize::MAX {
        tracing::warn!(
            asked = limits.max_connections,
            max_connections,
            soft,
            "--max-connections lowered to fit the open-file limit; raise it (ulimit -n, \
             LimitNOFILE=) to hold more connections"
        );
    }
    fitted
}

/// [`fit_to_fd_limit`] for two ports at once (the main one and the
/// agents'): both caps together fit under the open-file limit; when they
/// do not, each is lowered in proportion.
pub fn fit_two_to_fd_limit(
    main: ConnectionLimits,
    agents: ConnectionLimits,
) -> (ConnectionLimits, ConnectionLimits) {
    let total = main.max_connections.saturating_add(agents.max_connections);
    let fitted = fit_to_fd_limit(ConnectionLimits {
        max_connections: total,
        ..main
    });
    if fitted.max_connections >= total {
        return (main, agents);
    }
    let share = |n: usize| {
        let n = (n as u128 * fitted.max_connections as u128 / total.max(1) as u128).max(1);
        usize::try_from(n).unwrap_or(usize::MAX)
    };
    (
        ConnectionLimits {
            max_connections: share(main.max_connections),
            ..main
        },
        ConnectionLimits {
            max_connections: share(agents.max_connections),
            ..agents
        },
    )
}

/// Counts an event that may come in floods (failed TLS handshakes, refused
/// connections) and says which occurrences are worth a log line: the 1st,
/// 2nd, 4th, 8th, ... in each minute. A flood then costs a handful of lines
/// a minute, each saying how many there were so far, and a lone event is
/// always logged.
#[derive(Debug)]
pub struct Occurrences {
    window: Mutex<(Instant, u64)>,
}

impl Default for Occurrences {
    fn default() -> Self {
        Occurrences {
            window: Mutex::new((Instant::now(), 0)),
        }
    }
}

impl Occurrences {
    /// Counts one; returns how many there were in the current minute when
    /// this one is worth logging.
    pub fn record(&self) -> Option<u64> {
        let now = Instant::now();
        let mut window = self.window.lock();
        if now.duration_since(window.0) >= OCCURRENCE_WINDOW {
            *window = (now, 0);
        }
        window.1 += 1;
        crate::limits::worth_a_warning(window.1).then_some(window.1)
    }
}

/// The connections of one server: their slots, what each has open, and
/// whether the drain has started. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    open: AtomicUsize,
    /// Each tracked connection by its peer address, for the request layer.
    /// A lock per request, held only for a hash lookup.
    by_peer: Mutex<HashMap<SocketAddr, Arc<ConnectionState>>>,
    refused: Occurrences,
    reaped: Occurrences,
    draining: watch::Sender<bool>,
}

impl Connections {
    /// Connections under `limits`.
    pub fn new(limits: ConnectionLimits) -> Connections {
        Connections {
            shared: Arc::new(Shared {
                limits,
                open: AtomicUsize::new(0),
                by_peer: Mutex::new(HashMap::new()),
                refused: Occurrences::default(),
                reaped: Occurrences::default(),
                draining: watch::Sender::new(false),
            }),
        }
    }

    /// Connections open now (handshakes included).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// A slot for a connection just accepted from `peer`, or `None` when
    /// every slot is taken: the caller then drops the connection, which
    /// closes it. Refusals are logged, a few lines a minute at most.
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let shared = &self.shared;
        let max = shared.limits.max_connections;
        let taken = shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            });
        if taken.is_err() {
            if let Some(count) = shared.refused.record() {
                tracing::warn!(
                    %peer,
                    max_connections = max,
                    refused_this_minute = count,
                    "connection limit reached: closing new connections until idle ones are \
                     reaped (--max-connections)"
                );
            }
            return None;
        }
        Some(Slot {
            shared: self.shared.clone(),
        })
    }

    /// Wraps a connection that holds `slot`, so that it is reaped when
    /// idle, and registers it for the request layer.
    pub fn track<IO>(&self, io: IO, slot: Slot, peer: SocketAddr) -> Tracked<IO> {
        let now = Instant::now();
        let state = Arc::new(ConnectionState {
            open_requests: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            accepted: now,
            last_active: Mutex::new(now),
        });
        self.shared.by_peer.lock().insert(peer, state.clone());
        let limits = self.shared.limits;
        // The earlier of the two: a quick first request makes the idle
        // timeout the one that applies.
        let first = match (limits.first_request_timeout, limits.idle_timeout) {
            (Some(first), Some(idle)) => Some(first.min(idle)),
            (first, idle) => first.or(idle),
        };
        Tracked {
            io,
            timer: first.map(|after| Box::pin(tokio::time::sleep_until(now + after))),
            state,
            peer,
            read: 0,
            slot,
        }
    }

    /// Plain TCP connections from `incoming` (tonic's `TcpIncoming`), each
    /// admitted and tracked; those over the cap are closed at once.
    pub fn incoming<S>(
        &self,
        incoming: S,
    ) -> impl Stream<Item = Result<Tracked<TcpStream>, io::Error>> + Send + 'static
    where
        S: Stream<Item = Result<TcpStream, io::Error>> + Send + 'static,
    {
        let connections = self.clone();
        incoming.filter_map(move |accepted| match accepted {
            Ok(tcp) => {
                // A connection reset in the backlog has no peer any more.
                let peer = tcp.peer_addr().ok()?;
                let slot = connections.admit(peer)?;
                Some(Ok(connections.track(tcp, slot, peer)))
            }
            Err(e) => Some(Err(e)),
        })
    }

    /// Starts the drain: every streaming reply open now or later ends with
    /// `UNAVAILABLE`.
    pub fn start_drain(&self) {
        self.shared.draining.send_replace(true);
    }

    fn state_of(&self, peer: SocketAddr) -> Option<Arc<ConnectionState>> {
        self.shared.by_peer.lock().get(&peer).cloned()
    }
}

/// A connection's place under the cap, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct ConnectionState {
    open_requests: AtomicUsize,
    started: AtomicBool,
    accepted: Instant,
    /// When the last request ended.
    last_active: Mutex<Instant>,
}

/// What the reaping timer decides when it fires.
enum Verdict {
    /// Look again at this instant.
    Until(Instant),
    /// Nothing can make this connection idle-reaped: stop the timer.
    Never,
    /// Close it, for this reason.
    Close(&'static str),
}

impl ConnectionState {
    fn verdict(&self, limits: &ConnectionLimits, now: Instant) -> Verdict {
        let due = |deadline: Instant, why| {
            if deadline <= now {
                Verdict::Close(why)
            } else {
                Verdict::Until(deadline)
            }
        };
        if !self.started.load(Ordering::Acquire) {
            return match (limits.first_request_timeout, limits.idle_timeout) {
                (Some(first), _) => due(
                    self.accepted + first,
                    "no request within the first-request timeout",
                ),
                (None, Some(idle)) => due(self.accepted + idle, "no request for the idle timeout"),
                (None, None) => Verdict::Never,
            };
        }
        let Some(idle) = limits.idle_timeout else {
            return Verdict::Never;
        };
        if self.open_requests.load(Ordering::Acquire) > 0 {
            // Busy: look again when it could first be idle long enough.
            return Verdict::Until(now + idle);
        }
        due(
            *self.last_active.lock() + idle,
            "no request for the idle timeout",
        )
    }
}

/// A connection under the cap that closes itself when idle too long: its
/// reads fail once the reaping timer decides so, and hyper then drops it.
/// Everything else passes through to the inner stream.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    timer: Option<Pin<Box<Sleep>>>,
    state: Arc<ConnectionState>,
    peer: SocketAddr,
    read: u64,
    slot: Slot,
}

impl<IO> Tracked<IO> {
    /// Polls the reaping timer; `Err` when the connection is to close.
    fn reap(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while let Some(timer) = self.timer.as_mut() {
            if timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            match self.state.verdict(&self.slot.shared.limits, Instant::now()) {
                Verdict::Until(at) => timer.as_mut().reset(at),
                Verdict::Never => self.timer = None,
                Verdict::Close(why) => {
                    self.timer = None;
                    tracing::debug!(peer = %self.peer, bytes_read = self.read, why, "closing an idle connection");
                    if let Some(count) = self.slot.shared.reaped.record() {
                        tracing::info!(
                            peer = %self.peer,
                            no_preface = self.read < PREFACE_LEN,
                            why,
                            reaped_this_minute = count,
                            "closed an idle connection"
                        );
                    }
                    return Err(io::Error::new(io::ErrorKind::TimedOut, why));
                }
            }
        }
        Ok(())
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        let mut by_peer = self.slot.shared.by_peer.lock();
        // The address may already belong to a newer connection.
        if by_peer
            .get(&self.peer)
            .is_some_and(|state| Arc::ptr_eq(state, &self.state))
        {
            by_peer.remove(&self.peer);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Err(e) = this.reap(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.read = this
            .read
            .saturating_add((buf.filled().len() - before) as u64);
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The inner stream's connection information, unchanged: request handlers
/// (peer address, client certificates) see what they would without us.
impl<IO: Connected> Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn occurrences_log_powers_of_two_per_minute() {
        let seen = Occurrences::default();
        let logged: Vec<u64> = (0..200).filter_map(|_| seen.record()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128]);
        tokio::time::advance(OCCURRENCE_WINDOW).await;
        assert_eq!(seen.record(), Some(1), "a new minute starts counting again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_reaped_before_its_first_request_and_when_idle() {
        let limits = ConnectionLimits {
            max_connections: 1,
            first_request_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
        };
        let start = Instant::now();
        let state = ConnectionState {
            open_requests: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            accepted: start,
            last_active: Mutex::new(start),
        };
        assert!(
            matches!(state.verdict(&limits, start), Verdict::Until(t) if t == start + Duration::from_secs(10))
        );
        assert!(matches!(
            state.verdict(&limits, start + Duration::from_secs(10)),
            Verdict::Close(_)
        ));
        state.started.store(true, Ordering::Release);
        state.open_requests.store(1, Ordering::Release);
        let later = start + Duration::from_secs(600);
        assert!(
            matches!(state.verdict(&limits, later), Verdict::Until(_)),
            "busy is not idle"
        );
        state.open_requests.store(0, Ordering::Release);
        *state.last_active.lock() = later;
        assert!(matches!(
            state.verdict(&limits, later + Duration::from_secs(59)),
            Verdict::Until(_)
        ));
        assert!(matches!(
            state.verdict(&limits, later + Duration::from_secs(60)),
            Verdict::Close(_)
        ));
    }

    #[test]
    fn the_cap_refuses_the_one_too_many_and_frees_on_drop() {
        let connections = Connections::new(ConnectionLimits {
            max_connections: 2,
            ..ConnectionLimits::unlimited()
        });
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = connections.admit(peer).unwrap();
        let _b = connections.admit(peer).unwrap();
        assert!(connections.admit(peer).is_none());
        drop(a);
        assert!(connections.admit(peer).is_some());
    }
}
