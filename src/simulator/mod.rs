//! A local stand-in for Qrypt's entropy API — a TEST AND DEMO TOOL, never a source of real
//! entropy.
//!
//! It speaks both dialects (`GET /api/v1/quantum-entropy`, `POST /api/v1/entropy`) with
//! bearer-token checks, over TLS with a throwaway CA it makes itself (or plain HTTP when asked),
//! and serves the operating system's randomness. Every answer carries the header
//! `X-Qseed-Simulator: not-real-entropy`. Tests can switch on faults and read back every byte
//! it served, to prove what reached an HSM.

mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use tls::TlsMaterial;

/// The label on every answer and in every banner.
pub const LABEL: &str = "not-real-entropy";
/// The header that carries [`LABEL`] on every answer.
pub const MARK_HEADER: &str = "x-qseed-simulator";

/// A misbehaviour to show on entropy requests, for error-path tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    #[default]
    None,
    /// Answer with this HTTP status and a short JSON error.
    Status(u16),
    /// A 200 whose body is not JSON.
    BadJson,
    /// A 200 without the blocks field.
    MissingField,
    /// A 200 whose first block is 1,000 bytes instead of 1,024.
    ShortBlock,
    /// A 200 whose first block is not base64.
    BadBase64,
    /// A 200 whose first block is all zero bytes (a stuck generator).
    AllZeroBlock,
    /// A 200 whose second block repeats its first (a replaying upstream).
    ReplayedBlock,
    /// A 200 whose blocks are the first ones ever served again (a server replaying old
    /// answers, across requests and client processes). Needs `record`.
    ReplayServed,
    /// 429 with `Retry-After: N` seconds.
    RateLimited { retry_after: u64 },
    /// 503 with `Retry-After: N` seconds.
    Unavailable { retry_after: u64 },
    /// A good answer after this long.
    Slow(std::time::Duration),
    /// No answer at all; the connection stays open.
    Hang,
    /// A 200 whose body breaks off halfway.
    TruncatedBody,
    /// A 307 to another origin (this URL).
    Redirect(&'static str),
    /// A 200 of valid JSON padded to 4 MiB.
    Oversized,
    /// A good body labelled `text/html`.
    WrongContentType,
}

/// How to start the simulator.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The bearer token clients must send; `None` accepts any request (an appliance).
    pub token: Option<String>,
    /// Serve HTTPS with a fresh throwaway CA (the default) or plain HTTP.
    pub tls: bool,
    /// Keep a copy of every byte served (for tests; grows without bound).
    pub record: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
            tls: true,
            record: false,
        }
    }
}

#[derive(Default)]
struct Shared {
    fault: Fault,
    /// `POST /api/v1/entropy` reads `block_size` in KiB (1..512), as Qrypt's qseed sends it,
    /// instead of bytes (1..1024), as the appliance's specification says.
    block_size_in_kib: bool,
    served: Vec<u8>,
    requests: u64,
    blocks_served: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The served bytes are what clients inject: never printed.
        f.debug_struct("Shared")
            .field("fault", &self.fault)
            .field(
                "served",
                &format_args!("{} bytes, redacted", self.served.len()),
            )
            .field("requests", &self.requests)
            .field("blocks_served", &self.blocks_served)
            .finish()
    }
}

#[derive(Clone)]
struct AppState {
    token: Option<Arc<str>>,
    record: bool,
    shared: Arc<Mutex<Shared>>,
}

/// A running simulator. Dropping it stops the server.
#[derive(Debug)]
pub struct Simulator {
    addr: SocketAddr,
    tls: Option<TlsMaterial>,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
}

impl Simulator {
    /// Binds and starts serving in the background on the current tokio runtime.
    pub async fn start(options: Options) -> std::io::Result<Self> {
        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let tls = if options.tls {
            Some(TlsMaterial::generate().map_err(std::io::Error::other)?)
        } else {
            None
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = AppState {
            token: options.token.map(Arc::from),
            record: options.record,
            shared: shared.clone(),
        };
        let router = Router::new()
            .route("/", get(index))
            .route("/api/v1/quantum-entropy", get(quantum_entropy))
            .route("/api/v1/entropy", post(entropy))
            .route("/api/v1/capabilities", get(capabilities))
            .with_state(state);
        let stop = CancellationToken::new();
        let acceptor = match &tls {
            Some(material) => Some(material.acceptor().map_err(std::io::Error::other)?),
            None => None,
        };
        tokio::spawn(tls::serve(listener, acceptor, router, stop.clone()));
        Ok(Self {
            addr,
            tls,
            shared,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL clients should use (`https://localhost:PORT` with TLS).
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The PEM of the throwaway CA that signed the server certificate (TLS only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    pub fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// Reads `block_size` of `POST /api/v1/entropy` in KiB (`true`) or in bytes.
    pub fn set_block_size_in_kib(&self, kib: bool) {
        self.lock().block_size_in_kib = kib;
    }

    /// Every byte served in good answers so far, in order, without the blocks a fault spoiled
    /// on purpose (only with `record`).
    pub fn served(&self) -> Vec<u8> {
        self.lock().served.clone()
    }

    /// Entropy requests received (good, faulty and refused).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// Blocks served in good answers.
    pub fn blocks_served(&self) -> u64 {
        self.lock().blocks_served
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn index() -> impl IntoResponse {
    labelled(
        StatusCode::OK,
        "qseed API simulator: a test and demo tool. Its entropy is the operating system's \
         randomness, not quantum entropy.\n",
    )
}

async fn capabilities() -> impl IntoResponse {
    labelled(
        StatusCode::OK,
        Json(serde_json::json!({
            "min_block_size": 1, "max_block_size": 1024,
            "min_block_count": 1, "max_block_count": 512,
            "entropy_types": ["simulated"],
        })),
    )
}

#[derive(Deserialize)]
struct SizeQuery {
    size: Option<String>,
}

async fn quantum_entropy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<SizeQuery>,
) -> Response {
    if let Some(refusal) = state.check(&headers) {
        return refusal;
    }
    let size = match query.size.as_deref().map(str::parse::<usize>) {
        None => 1,
        Some(Ok(k)) if (1..=512).contains(&k) => k,
        _ => return bad_request("size must be an integer from 1 to 512"),
    };
    state.answer("random", size, 1024, true).await
}

#[derive(Deserialize)]
struct EntropyRequest {
    block_size: Option<usize>,
    block_count: Option<usize>,
}

async fn entropy(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refusal) = state.check(&headers) {
        return refusal;
    }
    let Ok(request) = serde_json::from_slice::<EntropyRequest>(&body) else {
        return bad_request("the body must be JSON {\"block_size\": S, \"block_count\": C}");
    };
    let kib = state
        .shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .block_size_in_kib;
    let count = request.block_count.unwrap_or(1);
    if kib {
        let size = request.block_size.unwrap_or(1);
        if !(1..=512).contains(&size) || !(1..=512).contains(&count) {
            return bad_request("block_size must be 1..512 KiB and block_count 1..512");
        }
        return state.answer("entropy", count, size * 1024, false).await;
    }
    let size = request.block_size.unwrap_or(1024);
    if !(1..=1024).contains(&size) || !(1..=512).contains(&count) {
        return bad_request("block_size must be 1..1024 bytes and block_count 1..512");
    }
    state.answer("entropy", count, size, false).await
}

impl AppState {
    /// Counts the request and refuses it when the bearer token is wrong.
    fn check(&self, headers: &HeaderMap) -> Option<Response> {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requests += 1;
        let expected = self.token.as_deref()?;
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(expected) {
            None
        } else {
            Some(error(StatusCode::UNAUTHORIZED, "invalid or expired token"))
        }
    }

    async fn answer(
        &self,
        field: &str,
        count: usize,
        block_len: usize,
        with_size: bool,
    ) -> Response {
        let fault = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fault;
        match fault {
            Fault::Slow(delay) => tokio::time::sleep(delay).await,
            Fault::Hang => std::future::pending::<()>().await,
            Fault::RateLimited { retry_after } => {
                return retry_later(StatusCode::TOO_MANY_REQUESTS, retry_after)
            }
            Fault::Unavailable { retry_after } => {
                return retry_later(StatusCode::SERVICE_UNAVAILABLE, retry_after)
            }
            Fault::Redirect(to) => {
                let mut response = labelled(StatusCode::TEMPORARY_REDIRECT, "");
                if let Ok(location) = HeaderValue::from_str(to) {
                    response.headers_mut().insert("location", location);
                }
                return response;
            }
            _ => {}
        }
        let engine = &base64::engine::general_purpose::STANDARD;
        let mut blocks = Vec::with_capacity(count);
        let mut raw = Vec::with_capacity(count * block_len);
        // What a client may legitimately use: the blocks that are not faulty on purpose.
        let mut good = Vec::with_capacity(count * block_len);
        let replayed = (fault == Fault::ReplayServed).then(|| {
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .served
                .clone()
        });
        for i in 0..count {
            let len = if i == 0 && fault == Fault::ShortBlock {
                block_len.saturating_sub(24).max(1)
            } else {
                block_len
            };
            let mut block = vec![0u8; len];
            if getrandom::fill(&mut block).is_err() {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "no OS randomness");
            }
            if i == 0 && fault == Fault::AllZeroBlock {
                block.fill(0);
            }
            if i == 1 && fault == Fault::ReplayedBlock {
                block.copy_from_slice(&raw[..len]);
            }
            if let Some(old) = replayed
                .as_ref()
                .and_then(|s| s.get(i * len..(i + 1) * len))
            {
                block.copy_from_slice(old);
            }
            let mut text = engine.encode(&block);
            if i == 0 && fault == Fault::BadBase64 {
                text.replace_range(0..4, "@@@@");
            }
            let bad = (i == 0 && fault == Fault::AllZeroBlock)
                || (i == 1 && fault == Fault::ReplayedBlock)
                || fault == Fault::ReplayServed;
            if !bad {
                good.extend_from_slice(&block);
            }
            raw.extend_from_slice(&block);
            blocks.push(text);
        }
        let mut body = serde_json::Map::new();
        if fault != Fault::MissingField {
            body.insert(field.into(), serde_json::json!(blocks));
        }
        if with_size {
            body.insert("size".into(), serde_json::json!(count));
        }
        match fault {
            Fault::Status(code) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return error(status, "simulated failure");
            }
            Fault::BadJson => {
                return labelled(
                    StatusCode::OK,
                    (
                        [("content-type", "application/json")],
                        "{\"random\": [\"AAAA",
                    ),
                )
            }
            Fault::TruncatedBody => {
                let text = serde_json::Value::Object(body).to_string();
                let half = text.as_bytes()[..text.len() / 2].to_vec();
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
                    Ok(half),
                    Err(std::io::Error::other("simulated connection loss")),
                ];
                // A pause after the first half, so the status line and half the body are on
                // the wire before the connection breaks.
                let stream = futures_util::StreamExt::then(
                    futures_util::stream::iter(chunks),
                    |chunk| async move {
                        if chunk.is_err() {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        chunk
                    },
                );
                return labelled(
                    StatusCode::OK,
                    (
                        [("content-type", "application/json")],
                        axum::body::Body::from_stream(stream),
                    ),
                );
            }
            Fault::Oversized => {
                body.insert("padding".into(), serde_json::json!("A".repeat(4 << 20)));
                return labelled(StatusCode::OK, Json(serde_json::Value::Object(body)));
            }
            Fault::WrongContentType => {
                let text = serde_json::Value::Object(body).to_string();
                return labelled(StatusCode::OK, ([("content-type", "text/html")], text));
            }
            Fault::None | Fault::AllZeroBlock | Fault::ReplayedBlock | Fault::Slow(_) => {
                let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
                shared.blocks_served += count as u64;
                if self.record {
                    shared.served.extend_from_slice(&good);
                }
            }
            Fault::MissingField
            | Fault::ShortBlock
            | Fault::BadBase64
            | Fault::ReplayServed
            | Fault::Hang
            | Fault::RateLimited { .. }
            | Fault::Unavailable { .. }
            | Fault::Redirect(_) => {}
        }
        labelled(StatusCode::OK, Json(serde_json::Value::Object(body)))
    }
}

fn labelled(status: StatusCode, body: impl IntoResponse) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(MARK_HEADER, HeaderValue::from_static(LABEL));
    response
}

fn retry_later(status: StatusCode, seconds: u64) -> Response {
    let mut response = error(status, "try again later");
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(seconds));
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    labelled(status, Json(serde_json::json!({ "error": message })))
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}
