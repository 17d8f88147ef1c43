//! What can go wrong while fetching entropy, in words an operator can act on.

use std::time::Duration;

use super::answer::AnswerError;

/// A failed request. Messages never hold the token or any entropy.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "the entropy API rejected the access token (HTTP 401): it is wrong or has expired. \
         Create a new token in the Qrypt portal and put it in source.token_file or QRYPT_TOKEN"
    )]
    TokenRejected,
    #[error(
        "the entropy API refused the request (HTTP 403): the account's entropy quota for this \
         period is used up, or the token may not request entropy. Check the account in the \
         Qrypt portal"
    )]
    Forbidden,
    #[error("the entropy API is rate limiting this token (HTTP 429){}", retry_hint(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error(
        "the entropy API has not enough entropy right now (HTTP 503){}",
        retry_hint(*.retry_after)
    )]
    Unavailable { retry_after: Option<Duration> },
    #[error("the entropy API answered HTTP {status}{}", detail_suffix(.detail))]
    Status { status: u16, detail: String },
    #[error(
        "the entropy API answered with a redirect (HTTP {status}) to {location:?}; qseed does \
         not follow redirects, so the token never goes to another server: set source.url to \
         the final address"
    )]
    Redirect { status: u16, location: String },
    #[error("the entropy API's answer is not JSON (Content-Type {0:?})")]
    WrongContentType(String),
    #[error("the entropy API's answer is larger than the {limit} bytes it can be; refused")]
    TooLarge { limit: usize },
    #[error("could not reach the entropy API at {url}{via}: {reason}")]
    Transport {
        url: String,
        /// ` via proxy URL (VARIABLE)`, or empty for a direct connection.
        via: String,
        reason: String,
    },
    #[error(
        "reached {host}, but its certificate is not trusted: {reason}; set source.ca_file to the \
         CA that signed it, or check for a TLS-inspecting proxy between qseed and the API"
    )]
    Untrusted { host: String, reason: String },
    #[error("the entropy API's answer broke off before its end: {0}")]
    BodyCut(String),
    #[error("the entropy API did not answer within {0:?} (source.timeout)")]
    Timeout(Duration),
    #[error(
        "the health tests refused all {blocks} block(s) of the answer, so none was used: {first}"
    )]
    Unhealthy { blocks: usize, first: String },
    #[error(
        "no request sent: the entropy source failed moments ago ({reason}) and is backing off \
         for {}s",
        .retry_in.as_secs_f32().ceil()
    )]
    Waiting { retry_in: Duration, reason: String },
    #[error("the source delivered fewer bytes than the {needed} needed")]
    ShortDelivery { needed: usize },
    #[error(
        "{url} marked its answer as simulated (x-qseed-simulator: {}): it is qseed's API \
         simulator, which serves its own operating system's random numbers, not quantum \
         entropy; nothing of it was used. Point source.url at the entropy API, or set \
         source.allow_simulated = true for a test setup",
        crate::simulator::LABEL
    )]
    Simulated { url: String },
    #[error("the entropy API's answer was refused: {0}")]
    BadAnswer(#[from] AnswerError),
    #[error("device source {path}: {reason}")]
    Device { path: String, reason: String },
    #[error("{0}")]
    Sources(String),
    /// The replay record shared through the state folder cannot be kept: the answer was wiped
    /// unused (a block qseed cannot record could be used twice).
    #[error("{0}; the answer was wiped unused")]
    ReplayRecord(String),
    /// The server reads `block_size` in the other unit, and `block_unit` forbids switching.
    #[error("{0}")]
    BlockUnit(String),
}

impl SourceError {
    /// The HTTP status when there was one, else the kind of failure: a metrics label.
    pub fn outcome_label(&self) -> String {
        match self {
            SourceError::TokenRejected => "401".into(),
            SourceError::Forbidden => "403".into(),
            SourceError::RateLimited { .. } => "429".into(),
            SourceError::Unavailable { .. } => "503".into(),
            SourceError::Status { status, .. } | SourceError::Redirect { status, .. } => {
                status.to_string()
            }
            other => other.kind().replace(' ', "_"),
        }
    }

    /// A short name of the kind of failure, to tell a new problem from the same one again.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::TokenRejected => "token rejected",
            SourceError::Forbidden => "forbidden",
            SourceError::RateLimited { .. } => "rate limited",
            SourceError::Unavailable { .. } => "unavailable",
            SourceError::Status { .. } => "HTTP error",
            SourceError::Redirect { .. } => "redirect",
            SourceError::WrongContentType(_) => "wrong content type",
            SourceError::TooLarge { .. } => "answer too large",
            SourceError::Transport { .. } => "unreachable",
            SourceError::Untrusted { .. } => "untrusted certificate",
            SourceError::Timeout(_) => "timeout",
            SourceError::BodyCut(_) => "answer cut off",
            SourceError::BadAnswer(_) => "bad answer",
            SourceError::Unhealthy { .. } => "health tests failed",
            SourceError::Waiting { .. } => "waiting",
            SourceError::ShortDelivery { .. } => "short delivery",
            SourceError::Simulated { .. } => "simulated answer",
            SourceError::Device { .. } => "device error",
            SourceError::Sources(_) => "no source",
            SourceError::ReplayRecord(_) => "replay record",
            SourceError::BlockUnit(_) => "block unit",
        }
    }
}

fn retry_hint(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!("; it asks to retry after {}s", d.as_secs()),
        None => String::new(),
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}
