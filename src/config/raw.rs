//! The configuration file as written: shapes and types only, no file access, no secrets read.
//!
//! Every table denies unknown keys, so a misspelt key is an error instead of a silent default.

use std::path::PathBuf;

use serde::Deserialize;

use super::values::{DurationValue, InlineSecret};
use crate::source::Dialect;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[source]` (one source) or `[[source]]` tables (several).
    #[serde(default)]
    pub source: RawSources,
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub service: RawService,
    #[serde(default, rename = "target")]
    pub targets: Vec<RawTarget>,
    #[serde(default)]
    pub audit: RawAudit,
}

/// `[audit]`: signing the audit ledger's chain head with a key in an HSM.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// The target whose token holds the signing key.
    pub sign_with: Option<String>,
    /// The private key's CKA_LABEL (default `qseed-audit`).
    pub key_label: Option<String>,
    /// How often the head is signed (default one hour).
    pub sign_every: Option<DurationValue>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub state_dir: Option<PathBuf>,
    pub log_repeat: Option<DurationValue>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub max_bytes: Option<i64>,
    pub max_age: Option<DurationValue>,
    pub horizon: Option<DurationValue>,
    pub flush_timeout: Option<DurationValue>,
    pub min_entropy: Option<f64>,
    pub false_alarm: Option<f64>,
    pub sources: Option<SourcesMode>,
    pub mix_fallback: Option<MixFallback>,
}

/// The `source` key: one table, or an array of tables. Either way each table is read with
/// [`RawSource`]'s own checks (unknown keys are errors, named as such).
#[derive(Debug, Default)]
pub struct RawSources {
    pub list: Vec<RawSource>,
    /// Written as `[[source]]`.
    pub array: bool,
}

impl RawSources {
    /// The one source (made if none was written); `None` when there are several.
    pub fn single_mut(&mut self) -> Option<&mut RawSource> {
        if self.list.is_empty() {
            self.list.push(RawSource::default());
        }
        match &mut self.list[..] {
            [one] => Some(one),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for RawSources {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = RawSources;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [source] table or [[source]] tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawSources, A::Error> {
                let one =
                    RawSource::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawSources {
                    list: vec![one],
                    array: false,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawSources, A::Error> {
                let list = Vec::<RawSource>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(RawSources { list, array: true })
            }
        }
        deserializer.deserialize_any(OneOrMany)
    }
}

/// What a source is.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Qrypt's entropy API: the cloud service or an on-premises appliance.
    #[default]
    Qrypt,
    /// A file, character device or FIFO read in whole blocks (a hardware QRNG).
    Device,
}

/// `[pool] sources`: how several sources are used.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourcesMode {
    Failover,
    Mix,
}

/// `[pool] mix_fallback`: what mixing does with one healthy source.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MixFallback {
    Skip,
    Failover,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// In logs, metrics and audit records; needed with several sources.
    pub name: Option<String>,
    pub kind: Option<SourceKind>,
    /// `kind = "device"`: the file, character device or FIFO.
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub dialect: Option<Dialect>,
    /// `dialect = "entropy"`: how the server reads `block_size`.
    pub block_unit: Option<crate::source::block_unit::BlockUnit>,
    pub auth: Option<Auth>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Option<DurationValue>,
    pub allow_http: Option<bool>,
    pub allow_simulated: Option<bool>,
    /// Bytes this source may sell per calendar month (UTC); warned about, never enforced.
    pub monthly_budget: Option<super::values::ByteCount>,
    /// An HTTP proxy URL, or "none"; unset: the environment's (HTTPS_PROXY, NO_PROXY).
    pub proxy: Option<String>,
    /// Only from Qrypt's old YAML file (`qrypt_token`), never from TOML.
    #[serde(skip)]
    pub inline_token: Option<InlineSecret>,
}

/// `self.k = other.k` for every key `other` sets: an override from the environment.
macro_rules! merge {
    ($kind:ty: $($key:ident),+) => {
        impl $kind {
            pub fn merge(&mut self, other: $kind) {
                $(if other.$key.is_some() {
                    self.$key = other.$key;
                })+
            }
        }
    };
}
// `proxy` is not among them: a proxy URL may hold a password, and overrides are shown.
merge!(RawSource: url, dialect, block_unit, auth, token_file, ca_file, timeout, allow_http, allow_simulated, monthly_budget, path);
merge!(RawPool: max_bytes, max_age, horizon, flush_timeout, min_entropy, false_alarm, sources, mix_fallback);
merge!(RawTelemetry: listen);
merge!(RawService: state_dir, log_repeat);

/// How requests authenticate: Qrypt's cloud needs a bearer token; an appliance may need none.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Auth {
    Bearer,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: Option<String>,
    /// `pkcs11` (the default) or `kernel`: the host kernel's generator.
    pub kind: Option<TargetKind>,
    /// `kind = "kernel"`: the entropy RNDADDENTROPY claims, `none` (default) or `full`.
    pub credit: Option<crate::kernel::Credit>,
    /// Read a few bytes of the token's own output after each seed (cloned generators).
    pub check_output: Option<bool>,
    pub module: Option<PathBuf>,
    /// An RFC 7512 `pkcs11:` URI naming the token (and maybe the module and PIN).
    pub token: Option<String>,
    pub token_label: Option<String>,
    pub slot_id: Option<i64>,
    pub serial: Option<String>,
    pub login: Option<Login>,
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
    pub pin: Option<InlineSecret>,
    pub size: Option<i64>,
    pub period: Option<DurationValue>,
    pub offset: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
    pub max_seed: Option<i64>,
    pub init_args: Option<String>,
}

/// What a `[[target]]` seeds.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A PKCS#11 token, with `C_SeedRandom`.
    #[default]
    Pkcs11,
    /// The host kernel, with `ioctl(RNDADDENTROPY)` and `RNDRESEEDCRNG`.
    Kernel,
}

/// Whether to log in before seeding.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Login {
    /// `C_Login` as `CKU_USER` (the Crypto User on Luna) once per session.
    User,
    /// Seed in a public session (SoftHSM, NSS and Kryoptic accept this).
    None,
}
