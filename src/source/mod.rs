//! Where entropy comes from.
//!
//! A source delivers whole blocks of [`BLOCK_LEN`] bytes. Today there is one kind, the Qrypt
//! entropy REST API ([`qrypt::QryptClient`]); the [`EntropySource`] trait is the seam for the
//! others that are planned (the on-premises appliance speaks the same API; a local device file).

pub mod answer;
pub mod backoff;
pub mod block_unit;
pub mod device;
pub mod error;
pub mod proxy;
pub mod qrypt;
pub mod quota;
pub mod set;

use std::future::Future;

use serde::Deserialize;

pub use error::SourceError;

use crate::secret::EntropyBytes;

/// Set once an answer marked by qseed's API simulator was accepted (`allow_simulated`):
/// from then on doctor, the audit records and the `qseed_entropy_simulated` metric say that
/// the entropy is simulated (issue 22, item 12). Process-wide: one process, one verdict.
static SIMULATED_ACCEPTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether simulated entropy was accepted in this process.
pub fn simulated_accepted() -> bool {
    SIMULATED_ACCEPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// An answer from `url` carried the simulator's mark and was let through: said loudly once.
pub fn note_simulated(url: &str) {
    if !SIMULATED_ACCEPTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "{url} is qseed's API simulator: its answers are SIMULATED entropy (the operating \
             system's random bytes), not quantum entropy. Accepted because source.allow_simulated \
             = true; fine for a test, never for production"
        );
    }
}

/// Bytes per block: the API sells entropy by the KiB.
pub const BLOCK_LEN: usize = 1024;

/// Most blocks one request may ask for (both Qrypt clients and the appliance enforce it).
pub const MAX_BLOCKS_PER_REQUEST: usize = 512;

/// How to reach the entropy API.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub url: url::Url,
    pub dialect: Dialect,
    /// `None` only with `auth = "none"`. `SecretString` prints as redacted.
    pub token: Option<secrecy::SecretString>,
    pub ca_file: Option<std::path::PathBuf>,
    pub timeout: std::time::Duration,
    pub allow_http: bool,
    /// Accept answers marked as coming from qseed's API simulator (tests, the demo).
    pub allow_simulated: bool,
    /// `[source] monthly_budget`: bytes per calendar month (UTC), warned about (see
    /// [`quota`]).
    pub monthly_budget: Option<u64>,
    /// `[source] proxy`; the route itself is decided when the client is built (see [`proxy`]).
    pub proxy: proxy::ProxySetting,
    /// `[source] block_unit`: how `POST /api/v1/entropy` reads `block_size` (see
    /// [`block_unit`]).
    pub block_unit: block_unit::BlockUnit,
}

/// Which of the two request forms the server speaks (see `entropy-api.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// `GET /api/v1/quantum-entropy?size=K`: the documented cloud API.
    #[default]
    QuantumEntropy,
    /// `POST /api/v1/entropy` with `{"block_size": 1024, "block_count": K}` (bytes per block,
    /// as the appliance's written specification says).
    Entropy,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::QuantumEntropy => "quantum-entropy",
            Dialect::Entropy => "entropy",
        }
    }
}

/// Something that sells entropy by the block.
pub trait EntropySource: Send + Sync + 'static {
    /// Fetches exactly `blocks` blocks of [`BLOCK_LEN`] bytes (1..=[`MAX_BLOCKS_PER_REQUEST`]),
    /// in one buffer of `blocks * BLOCK_LEN` bytes, or fails without returning any of an
    /// answer's bytes.
    fn fetch(
        &self,
        blocks: usize,
    ) -> impl Future<Output = Result<EntropyBytes, SourceError>> + Send;

    /// A short, secret-free description for logs (e.g. the base URL).
    fn describe(&self) -> String;

    /// The way requests take to the source (see [`proxy::Route`]), for sources that go
    /// over the network.
    fn route(&self) -> Option<&proxy::Route> {
        None
    }

    /// [`EntropySource::fetch`], and which of several sources the bytes came from (see
    /// [`set::SourceSet`]), for the audit records. A source set may return fewer blocks than
    /// asked when its sources' own health tests refused some.
    fn fetch_from(
        &self,
        blocks: usize,
    ) -> impl Future<Output = Result<(EntropyBytes, Option<String>), SourceError>> + Send {
        async move { self.fetch(blocks).await.map(|bytes| (bytes, None)) }
    }

    /// Each source's figures (for the metrics; most are shown only when there are several).
    fn sources(&self) -> Vec<set::MemberSnapshot> {
        Vec::new()
    }
}
