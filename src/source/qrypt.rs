//! The Qrypt entropy REST API client (cloud service and on-premises appliance).

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use url::Url;
use zeroize::Zeroizing;

use super::block_unit::{BlockUnit, Reading, UnitChoice, Verdict};
use super::proxy::{self, Route};
use super::SourceConfig;
use super::{answer, Dialect, EntropySource, SourceError, BLOCK_LEN, MAX_BLOCKS_PER_REQUEST};
use crate::secret::EntropyBytes;

/// Answers longer than this many bytes per block are refused unread (base64 of 1 KiB is 1,368
/// bytes; the rest is JSON punctuation and slack for whitespace and escaped slashes).
/// How much of an error answer's body is read, for the excerpt in the message.
const ERROR_BODY_LIMIT: usize = 4096;
const MAX_ANSWER_BYTES_PER_BLOCK: usize = 2 * 1368;
const MAX_ANSWER_OVERHEAD: usize = 16 * 1024;

/// One HTTP client for one API base URL and token.
#[derive(Clone)]
pub struct QryptClient {
    http: reqwest::Client,
    base: Url,
    dialect: Dialect,
    /// `Authorization: Bearer …`, marked sensitive so reqwest never prints it.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    allow_simulated: bool,
    route: Route,
    /// How `POST /api/v1/entropy` reads `block_size` (see [`super::block_unit`]); shared by
    /// clones.
    unit: std::sync::Arc<UnitChoice>,
    /// The bytes bought this month against `monthly_budget` (see [`super::quota`]).
    month: std::sync::Arc<super::quota::MonthlyCount>,
    /// The API token's expiry, when it is a JWT.
    token_expiry: Option<std::time::SystemTime>,
}

impl std::fmt::Debug for QryptClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QryptClient")
            .field("base", &self.base.as_str())
            .field("dialect", &self.dialect)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("route", &self.route)
            .finish()
    }
}

/// Why a client could not be built (bad CA file and the like).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientSetupError(String);

impl QryptClient {
    /// A client for the service: no idle connection is kept between its requests (see below).
    pub fn new(config: &SourceConfig) -> Result<Self, ClientSetupError> {
        Self::build(config, false)
    }

    /// A client for bulk downloads (`qseed fetch`): connections are kept for the next request,
    /// whose answer follows at once.
    pub fn for_bulk(config: &SourceConfig) -> Result<Self, ClientSetupError> {
        Self::build(config, true)
    }

    fn build(config: &SourceConfig, keep_alive: bool) -> Result<Self, ClientSetupError> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .https_only(!config.allow_http)
            .redirect(reqwest::redirect::Policy::none())
            // The whole request, the connection, and any one read of a stalled body.
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .user_agent(concat!("qseed/", env!("CARGO_PKG_VERSION")))
            // The service keeps no idle connection: its read and TLS buffers would hold the
            // last answer's base64 until the next request, minutes later. A closed
            // connection's buffers are freed, and the allocator wipes them. A request every
            // few minutes can afford its own handshake.
            .pool_max_idle_per_host(if keep_alive { 4 } else { 0 });
        let route = proxy::route(&config.proxy, &config.url, |name| std::env::var(name).ok())
            .map_err(ClientSetupError)?;
        // The route was decided above; the HTTP client must not read the environment again.
        builder = builder.no_proxy();
        if let Some(url) = route.proxy() {
            // Credentials in the URL become the Proxy-Authorization header.
            let proxy = reqwest::Proxy::all(url.as_str()).map_err(|e| {
                ClientSetupError(format!(
                    "cannot use the proxy {}: {e}",
                    proxy::redacted(url)
                ))
            })?;
            builder = builder.proxy(proxy);
        }
        if let Some(ca) = &config.ca_file {
            let (pem, _) = crate::files::read_bounded(ca, crate::files::CA_LIMIT).map_err(|e| {
                ClientSetupError(format!(
                    "cannot read source.ca_file {}: {e} (it should be a PEM certificate file)",
                    ca.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ClientSetupError(format!(
                    "source.ca_file {} holds no usable PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(ClientSetupError(format!(
                    "source.ca_file {} holds no PEM certificate",
                    ca.display()
                )));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ClientSetupError(format!("cannot set up the HTTPS client: {e}")))?;
        let authorization = match &config.token {
            Some(token) => Some(bearer(token)?),
            None => None,
        };
        let mut base = config.url.clone();
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let unit = std::sync::Arc::new(UnitChoice::new(config.block_unit, base.as_str(), None));
        let month = std::sync::Arc::new(super::quota::MonthlyCount::new(
            base.as_str(),
            config.monthly_budget,
            None,
        ));
        Ok(Self {
            http,
            base,
            dialect: config.dialect,
            authorization,
            timeout: config.timeout,
            allow_simulated: config.allow_simulated,
            route,
            unit,
            month,
            token_expiry: config.token.as_ref().and_then(super::quota::token_expiry),
        })
    }

    /// The API token's expiry, when the token is a JWT.
    pub fn token_expiry(&self) -> Option<std::time::SystemTime> {
        self.token_expiry
    }

    /// This month's bytes, forecast and budget.
    pub fn month_figures(&self) -> super::quota::MonthFigures {
        self.month.figures()
    }

    /// Keeps what `block_unit = "auto"` learns about this server in `state` (the state
    /// folder), and starts from what an earlier process learned.
    pub fn remembering_in(mut self, state: Option<&std::path::Path>) -> Self {
        self.unit = std::sync::Arc::new(UnitChoice::new(
            self.unit.setting(),
            self.base.as_str(),
            state,
        ));
        self.month = std::sync::Arc::new(super::quota::MonthlyCount::new(
            self.base.as_str(),
            self.month.figures().budget,
            state,
        ));
        self
    }

    /// How `block_size` is read now (`"bytes"` or `"kib"`), for `POST /api/v1/entropy`.
    pub fn block_unit(&self) -> Option<&'static str> {
        (self.dialect == Dialect::Entropy).then(|| self.unit.reading().as_str())
    }

    /// `block_unit` as configured.
    pub fn block_unit_setting(&self) -> BlockUnit {
        self.unit.setting()
    }

    fn request(&self, blocks: usize, unit: Reading) -> reqwest::RequestBuilder {
        let builder = match self.dialect {
            Dialect::QuantumEntropy => {
                let url = self.endpoint("api/v1/quantum-entropy");
                self.http.get(url).query(&[("size", blocks)])
            }
            Dialect::Entropy => {
                let url = self.endpoint("api/v1/entropy");
                self.http.post(url).json(&serde_json::json!({
                    "block_size": unit.block_size(),
                    "block_count": blocks,
                }))
            }
        };
        let builder = builder.header(ACCEPT, "application/json");
        match &self.authorization {
            Some(value) => builder.header(AUTHORIZATION, value.clone()),
            None => builder,
        }
    }

    /// What an appliance says of itself at `GET /api/v1/capabilities` (the top-level keys of
    /// its JSON answer, and their values where they are short), for `doctor`; `None` where
    /// nothing usable answers (the cloud API has no such endpoint).
    pub async fn capabilities(&self) -> Option<String> {
        let mut request = self
            .http
            .get(self.endpoint("api/v1/capabilities"))
            .header(ACCEPT, "application/json");
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = self.read_excerpt(response).await;
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        let fields: Vec<String> = value
            .as_object()?
            .iter()
            .take(8)
            .map(|(key, value)| match value {
                serde_json::Value::String(s) if s.len() <= 40 => format!("{key}={s}"),
                serde_json::Value::Number(n) => format!("{key}={n}"),
                serde_json::Value::Bool(b) => format!("{key}={b}"),
                _ => key.clone(),
            })
            .collect();
        Some(fields.join(", "))
    }

    fn endpoint(&self, path: &str) -> Url {
        // The base always ends in '/', and `path` is relative, so this cannot fail.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    async fn fetch_blocks(
        &self,
        blocks: usize,
        unit: Reading,
    ) -> Result<EntropyBytes, SourceError> {
        let response = self
            .request(blocks, unit)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_redirection() {
            let location = header_text(&response, LOCATION);
            return Err(SourceError::Redirect {
                status: status.as_u16(),
                location,
            });
        }
        if status != reqwest::StatusCode::OK {
            return Err(self.status_error(response).await);
        }
        // The simulator marks every answer; outside a test setup they must not pass for
        // entropy that was paid for.
        if !self.allow_simulated
            && response
                .headers()
                .contains_key(crate::simulator::MARK_HEADER)
        {
            return Err(SourceError::Simulated {
                url: self.base.to_string(),
            });
        }
        if response
            .headers()
            .contains_key(crate::simulator::MARK_HEADER)
        {
            super::note_simulated(self.base.as_ref());
        }
        let content_type = header_text(&response, CONTENT_TYPE);
        if !is_json(&content_type) {
            return Err(SourceError::WrongContentType(content_type));
        }
        let limit = blocks * MAX_ANSWER_BYTES_PER_BLOCK + MAX_ANSWER_OVERHEAD;
        // Blocks of 1 MiB for block_size 1024: a server that reads KiB. Told by the length
        // alone, and not read: they would be refused whole anyway.
        if self.dialect == Dialect::Entropy && unit == Reading::Bytes {
            const MIB_AS_BASE64: u64 = 4 * (1024 * 1024_u64).div_ceil(3);
            let per_block = response.content_length().map(|n| n / blocks as u64);
            if per_block.is_some_and(|n| (MIB_AS_BASE64..MIB_AS_BASE64 + 64).contains(&n)) {
                return Err(SourceError::BadAnswer(
                    super::answer::AnswerError::WrongBlockLength {
                        index: 0,
                        asked: BLOCK_LEN,
                        got: BLOCK_LEN * 1024,
                    },
                ));
            }
        }
        let body = self.read_body(response, limit).await?;
        Ok(answer::parse(self.dialect, &body, blocks, BLOCK_LEN)?)
    }

    /// Reads the body into one wiping buffer sized up front, so growth never leaves copies.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Zeroizing<Vec<u8>>, SourceError> {
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(SourceError::TooLarge { limit });
        }
        let mut body = Zeroizing::new(Vec::with_capacity(limit));
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(SourceError::Timeout(self.timeout)),
                Err(e) => return Err(SourceError::BodyCut(error_chain(&e))),
            };
            if body.len() + chunk.len() > limit {
                return Err(SourceError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn status_error(&self, response: reqwest::Response) -> SourceError {
        let status = response.status().as_u16();
        let retry_after = retry_after(&response);
        match status {
            401 => SourceError::TokenRejected,
            403 => SourceError::Forbidden,
            429 => SourceError::RateLimited { retry_after },
            503 => SourceError::Unavailable { retry_after },
            // A 2xx other than 200 may carry entropy in its body: none of it in a message.
            200..=299 => SourceError::Status {
                status,
                detail: "(body not shown: a 2xx answer's body may hold entropy)".into(),
            },
            _ => {
                let requested = response.url().clone();
                // An excerpt for support, read bounded: a server must not make qseed read an
                // endless error body into memory.
                let text = self.read_excerpt(response).await;
                let mut detail: String =
                    text.chars().filter(|c| !c.is_control()).take(200).collect();
                if status == 404 {
                    // Usually a base URL with a path the server does not have.
                    detail = format!(
                        "{detail}{}no such endpoint at {requested}; source.url is the API's base \
                         URL (qseed adds /api/v1/... itself), and source.dialect must be the one \
                         the server speaks",
                        if detail.is_empty() { "" } else { "; " }
                    );
                }
                SourceError::Status { status, detail }
            }
        }
    }

    /// At most [`ERROR_BODY_LIMIT`] bytes of an error answer's body, as text; the rest is never
    /// read (the connection is dropped).
    async fn read_excerpt(&self, mut response: reqwest::Response) -> String {
        let mut body = Vec::with_capacity(ERROR_BODY_LIMIT);
        while body.len() < ERROR_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = ERROR_BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                _ => break,
            }
        }
        String::from_utf8_lossy(&body).into_owned()
    }

    fn transport_error(&self, e: reqwest::Error) -> SourceError {
        if e.is_timeout() {
            return SourceError::Timeout(self.timeout);
        }
        let reason = error_chain(&e);
        // A certificate that is not trusted is a different problem from an unreachable host:
        // the server answered.
        if let Some(at) = reason.find("invalid peer certificate") {
            return SourceError::Untrusted {
                host: self.base.host_str().unwrap_or("the server").to_string(),
                reason: reason[at..].to_string(),
            };
        }
        SourceError::Transport {
            url: self.base.to_string(),
            via: match &self.route {
                Route::Proxy { .. } => format!(" {}", self.route),
                Route::Direct(_) => String::new(),
            },
            reason,
        }
    }
}

impl QryptClient {
    /// Bytes bought: counted against the month (the answer is paid for once it arrived).
    fn counted(&self, bytes: EntropyBytes) -> EntropyBytes {
        self.month.bought(bytes.len() as u64);
        bytes
    }
}

impl EntropySource for QryptClient {
    async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        debug_assert!((1..=MAX_BLOCKS_PER_REQUEST).contains(&blocks));
        let blocks = blocks.clamp(1, MAX_BLOCKS_PER_REQUEST);
        if self.dialect != Dialect::Entropy {
            return self
                .fetch_blocks(blocks, Reading::Bytes)
                .await
                .map(|bytes| self.counted(bytes));
        }
        let asked = self.unit.reading();
        let error = match self.fetch_blocks(blocks, asked).await {
            Ok(bytes) => return Ok(self.counted(bytes)),
            Err(e) => e,
        };
        match self.unit.judge(&error, asked, self.base.as_str()) {
            Verdict::Unrelated => Err(error),
            Verdict::Mismatch(explained) => Err(explained),
            // Once, in the other unit: a switch costs at most the one failed request.
            Verdict::Switched => self
                .fetch_blocks(blocks, self.unit.reading())
                .await
                .map(|bytes| self.counted(bytes)),
        }
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.base, self.dialect.as_str())
    }

    fn route(&self) -> Option<&Route> {
        Some(&self.route)
    }
}

/// The causes of a reqwest error, joined: its own message is too vague to act on.
fn error_chain(e: &reqwest::Error) -> String {
    let mut reason = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if !reason.is_empty() {
            reason.push_str(": ");
        }
        reason.push_str(&s.to_string());
        source = s.source();
    }
    if reason.is_empty() {
        reason = e.to_string();
    }
    reason
}

/// rustls needs one process-wide crypto provider; ring is the one we build with.
pub fn install_crypto_provider() {
    // An error only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn bearer(token: &SecretString) -> Result<HeaderValue, ClientSetupError> {
    let text = Zeroizing::new(format!("Bearer {}", token.expose_secret()));
    let mut value = HeaderValue::from_str(&text).map_err(|_| {
        ClientSetupError(
            "the API token holds characters that cannot go in an HTTP header; \
             check the token file or QRYPT_TOKEN for stray characters"
                .into(),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

fn header_text(response: &reqwest::Response, name: reqwest::header::HeaderName) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// `Retry-After` in both of its forms: seconds, or an HTTP-date (RFC 9110, section 10.2.3).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    parse_retry_after(response.headers().get(RETRY_AFTER)?.to_str().ok()?)
}

fn parse_retry_after(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(300);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!((298..=300).contains(&wait.as_secs()), "{wait:?}");
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past: no wait"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn content_type_check() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(!is_json("text/html"));
        assert!(!is_json(""));
    }
}
