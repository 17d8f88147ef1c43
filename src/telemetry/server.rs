//! The telemetry endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (every active target was seeded within twice its period). Plain HTTP, meant for
//! loopback or a monitoring network; it serves no secret.
//!
//! Anyone who can reach the port is a client, so no client may cost the service more than a
//! bounded share: at most [`MAX_CONNECTIONS`] at once (more are closed as soon as accepted),
//! [`HEADER_TIMEOUT`] to send a request's headers, and [`CONNECTION_LIFETIME`] in all. Idle or
//! half-sent connections are closed instead of holding file descriptors the entropy requests
//! and the HSM modules need.

use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Binds the endpoint's address (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Connections served at once; a Prometheus server or two and a person with curl need a few.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's headers (also the keep-alive idle limit: hyper
/// starts it again when it waits for the next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection stays open, however busy: a scraper then simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

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

async fn accept_loop(listener: TcpListener, router: Router, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut turned_away: u64 = 0;
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: its file descriptor is free again before the next accept.
            drop(stream);
            turned_away += 1;
            if turned_away.is_power_of_two() {
                tracing::warn!(
                    "telemetry endpoint: {turned_away} connection(s) turned away so far, \
                     {MAX_CONNECTIONS} already open (is something holding connections open?)"
                );
            }
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = stop.cancelled() => {}
            }
        });
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
