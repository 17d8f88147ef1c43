//! The telemetry endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (every active target was seeded within twice its period). Plain HTTP, meant for
//! loopback or a monitoring network; it serves no secret.
//!
//! Anyone who can reach the port is a client, so no client may cost the service more than a
//! bounded share, and none may keep others out:
//!
//! - A connection first waits for its whole request head (request line and headers, at most
//!   [`MAX_HEAD`] bytes, within [`HEADER_TIMEOUT`]). At most [`MAX_WAITING`] wait at once; when
//!   one more arrives, the one that has waited longest is closed. A scraper sends its request
//!   as soon as it connects, so a local user holding connections open without a request only
//!   ever evicts her own.
//! - Only a complete request takes one of the [`MAX_CONNECTIONS`] serving slots (a busy
//!   endpoint answers 503 at once), answered within [`CONNECTION_LIFETIME`], and the
//!   connection is then closed (no keep-alive: an idle client holds nothing).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Binds the endpoint's address (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Requests served at once; a Prometheus server or two and a person with curl need a few.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections waiting for their request head at once (the oldest is closed for a new one),
/// at most; fewer under a low file descriptor limit (see [`waiting_cap`]).
pub const MAX_WAITING: usize = 128;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a request head may be.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest a request takes to be answered, once its head is in (a scrape takes milliseconds;
/// a client that sends a head and then never reads holds its slot no longer).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Serves until `stop`.
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    tokio::spawn(accept_loop(listener, router, stop))
}

/// Connections waiting for their request head, oldest first, each with the token that
/// closes it.
#[derive(Default)]
struct Waiting {
    next: u64,
    connections: BTreeMap<u64, CancellationToken>,
}

/// How many may wait (and at most how many are served): an eighth of the file descriptor
/// limit, between 4 and [`MAX_WAITING`], so that clients never take the descriptors the
/// entropy requests and the modules need.
fn waiting_cap() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(limit / 8)
        .unwrap_or(usize::MAX)
        .clamp(4, MAX_WAITING)
}

impl Waiting {
    /// Admits a new connection, closing the oldest waiting one if `cap` already wait.
    fn admit(&mut self, cap: usize) -> (u64, CancellationToken, bool) {
        let mut evicted = false;
        while self.connections.len() >= cap {
            if let Some((_, oldest)) = self.connections.pop_first() {
                oldest.cancel();
                evicted = true;
            }
        }
        let id = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.connections.insert(id, token.clone());
        (id, token, evicted)
    }
}

async fn accept_loop(listener: TcpListener, router: Router, stop: CancellationToken) {
    let cap = waiting_cap();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS.min(cap)));
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let mut evictions: u64 = 0;
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin; the next
                    // accept will tell.
                    tracing::debug!("telemetry endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (id, evict, evicted) = waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(cap);
        if evicted {
            evictions += 1;
            if evictions.is_power_of_two() {
                tracing::warn!(
                    "telemetry endpoint: {evictions} connection(s) closed so far for sending no \
                     request while {cap} waited (is something holding connections open?)"
                );
            }
        }
        let (router, slots, waiting, stop) =
            (router.clone(), slots.clone(), waiting.clone(), stop.clone());
        tokio::spawn(async move {
            let head = tokio::select! {
                head = read_head(&stream) => head,
                _ = tokio::time::sleep(HEADER_TIMEOUT) => None,
                _ = evict.cancelled() => None,
                _ = stop.cancelled() => None,
            };
            waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .connections
                .remove(&id);
            let Some(head) = head else {
                return;
            };
            serve_request(stream, head, router, slots, stop).await;
        });
    }
}

/// Reads until the end of the request head (a blank line); `None` if the client closes first
/// or the head is larger than [`MAX_HEAD`]. What is read is handed to the server after.
async fn read_head(stream: &TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut piece = [0u8; 1024];
    loop {
        stream.readable().await.ok()?;
        match stream.try_read(&mut piece) {
            Ok(0) => return None,
            Ok(n) => {
                head.extend_from_slice(&piece[..n]);
                if head.windows(4).any(|w| w == b"\r\n\r\n")
                    || head.windows(2).any(|w| w == b"\n\n")
                {
                    return Some(head);
                }
                if head.len() > MAX_HEAD {
                    return None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
}

async fn serve_request(
    mut stream: TcpStream,
    head: Vec<u8>,
    router: Router,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let Ok(_slot) = slots.try_acquire_owned() else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
                  connection: close\r\nretry-after: 1\r\n\r\n",
            )
            .await;
        return;
    };
    let (read, write) = stream.into_split();
    // hyper reads the head already read, then the rest of the connection.
    let io = tokio::io::join(std::io::Cursor::new(head).chain(read), write);
    let service = TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = connection => {}
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
        _ = stop.cancelled() => {}
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n", problems.join("\n- ")),
        ),
    }
}

/// The address actually bound, for the log.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
