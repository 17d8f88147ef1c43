//! The configuration: a TOML file read in two stages.
//!
//! [`raw`] checks shapes and types (unknown keys are errors); [`load`] then resolves it into a
//! [`Config`]: ranges checked, relative paths made absolute against the file's folder, the API
//! token and PINs read into secret types. Errors name the file, the key, the value (never a
//! secret's) and what is allowed.

pub mod env;
pub mod legacy;
pub mod p11kit;
pub mod raw;
pub mod uri;
pub mod values;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use crate::pool::{HealthConfig, PoolConfig};
use crate::source::proxy::ProxySetting;
pub use crate::source::SourceConfig;
pub use crate::units::short_duration;
use raw::{Auth, Login, RawConfig, RawPool, RawService, RawSource, RawTarget};

/// Where the configuration lives unless `--config` or `QSEED_CONFIG_FILE` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/qseed/qseed.toml";
/// Qrypt's cloud service, East US: the only region documented today.
pub const DEFAULT_URL: &str = "https://api-eus.qrypt.com";
/// Environment variable holding the API token when no `token_file` is set.
pub const TOKEN_ENV: &str = "QRYPT_TOKEN";

pub const DEFAULT_SIZE: usize = 48;
pub const SIZE_RANGE: std::ops::RangeInclusive<usize> = 1..=65536;
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
pub const PERIOD_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(365 * 24 * 3600);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TELEMETRY_PORT: u16 = 9750;
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);
pub const MAX_BYTES_RANGE: std::ops::RangeInclusive<usize> = 65536..=64 * 1024 * 1024;
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(30 * 24 * 3600);
pub const HORIZON_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// `[pool] flush_timeout`: `0s` (off) up to 30 s, well inside systemd's stop timeout.
pub const FLUSH_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(30);

/// One configured entropy source (`[source]`, or one of the `[[source]]` tables).
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub name: String,
    pub kind: SourceSpecKind,
}

#[derive(Debug, Clone)]
pub enum SourceSpecKind {
    Qrypt(Box<SourceConfig>),
    Device(crate::source::device::DeviceConfig),
}

/// A checked configuration, ready to run.
#[derive(Debug)]
pub struct Config {
    /// The sources in the order written (failover tries them in this order).
    pub sources: Vec<SourceSpec>,
    /// `[pool] sources` (and `mix_fallback`).
    pub source_mode: crate::source::set::Mode,
    pub pool: PoolConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`qseed run`); `None`: off.
    pub telemetry_listen: Option<std::net::SocketAddr>,
    /// `[service] state_dir` as written (made absolute); where the PIN guard keeps its records
    /// when systemd's `$STATE_DIRECTORY` is not set. `None`: the default places.
    pub state_dir: Option<PathBuf>,
    /// `[service] log_repeat`: how often a failure that goes on is logged again.
    pub log_repeat: Duration,
    pub targets: Vec<TargetConfig>,
    /// Keys set by `QSEED_<TABLE>_<KEY>` environment variables.
    pub overrides: Vec<env::Override>,
    /// Read from Qrypt's qseed's YAML format.
    pub legacy: bool,
    /// `[audit] sign_with`: the ledger's head signed with a key in a target's token.
    pub audit_signing: Option<AuditSigning>,
}

/// Signing the audit ledger's chain head (see [`crate::telemetry::ledger`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSigning {
    /// The target whose token holds the key (its session signs).
    pub target: String,
    /// The private key's CKA_LABEL (an EC P-256 key).
    pub key_label: String,
    pub every: Duration,
}

/// The signing key's label when `[audit] key_label` is not given.
pub const DEFAULT_AUDIT_KEY_LABEL: &str = "qseed-audit";
/// How often the ledger's head is signed when `[audit] sign_every` is not given.
pub const DEFAULT_SIGN_EVERY: Duration = Duration::from_secs(3600);

/// One HSM token to seed.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    /// A PKCS#11 token, or the host kernel (then `module`, `token` and `login` are unused).
    pub kind: TargetKind,
    pub module: PathBuf,
    pub token: TokenSelector,
    /// The PIN to log in with and where it came from, or `None` to seed without logging in.
    pub login: Option<UserLogin>,
    pub size: usize,
    pub period: Duration,
    /// Delay of the first injection after start; later ones follow every `period` from there.
    /// Spreads many targets' calls over time instead of all at once.
    pub offset: Duration,
    /// Longest wait for one PKCS#11 call before it is reported as hung.
    pub timeout: Duration,
    /// Most bytes per `C_SeedRandom` call (a larger `size` goes in several calls); `None`:
    /// the module's known limit, if any (see `hsm::quirks`), else `size` in one call.
    pub max_seed: Option<usize>,
    /// Initialization parameters for the module's `C_Initialize` (NSS's softoken).
    pub init_args: Option<String>,
    /// Read the token's output after each seed to detect cloned generators (see
    /// [`crate::hsm::clone_watch`]).
    pub check_output: bool,
}

/// A user login: the PIN, and the identity of its source for the PIN guard.
#[derive(Debug, Clone)]
pub struct UserLogin {
    pub pin: cryptoki::types::AuthPin,
    pub source: PinSource,
}

/// Where a PIN came from, for messages. The PIN guard knows a PIN by a keyed digest of the
/// PIN itself (see [`crate::hsm::pin_guard`]), and a reload by the PIN and this: touching,
/// copying or re-linking a file, or editing another part of the configuration, changes
/// neither, so it never costs a new login (issue 22, item 4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PinSource {
    /// As the operator wrote it: `pin_file "/etc/qseed/hsm.pin"`.
    pub described: String,
}

impl TargetConfig {
    /// Whether `other` would seed the same token in the same way (a reload keeps such a
    /// target running). A changed PIN, or a changed PIN source, is a change.
    pub fn same_settings(&self, other: &TargetConfig) -> bool {
        use secrecy::ExposeSecret;
        let same_login = match (&self.login, &other.login) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.source == b.source && a.pin.expose_secret() == b.pin.expose_secret()
            }
            _ => false,
        };
        same_login
            && self.name == other.name
            && self.kind == other.kind
            && self.module == other.module
            && self.token == other.token
            && self.size == other.size
            && self.period == other.period
            && self.offset == other.offset
            && self.timeout == other.timeout
            && self.max_seed == other.max_seed
            && self.init_args == other.init_args
            && self.check_output == other.check_output
    }
}

/// What a target seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Pkcs11,
    /// The host kernel's generator (see [`crate::kernel`]), with the entropy it is credited.
    Kernel {
        credit: crate::kernel::Credit,
    },
}

/// How a target's token is found among the module's slots.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
    SlotId(u64),
    /// An RFC 7512 URI: every path attribute it gives must match.
    Uri(uri::Pkcs11Uri),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token_label {l:?}"),
            TokenSelector::Serial(s) => write!(f, "serial {s:?}"),
            TokenSelector::SlotId(id) => write!(f, "slot_id {id}"),
            TokenSelector::Uri(uri) => write!(f, "token {:?}", uri.to_string()),
        }
    }
}

/// A configuration problem, with the file it was found in.
#[derive(Debug, thiserror::Error)]
#[error("configuration {}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// Where the configuration is: `explicit` (`--config`, `QSEED_CONFIG_FILE`) if given; else
/// [`DEFAULT_PATH`], or Qrypt's qseed's [`legacy::DEFAULT_PATH`] when only that exists.
pub fn locate(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    let default = Path::new(DEFAULT_PATH);
    let legacy = Path::new(legacy::DEFAULT_PATH);
    if !default.exists() && legacy.exists() {
        legacy.to_path_buf()
    } else {
        default.to_path_buf()
    }
}

/// Reads, parses and resolves the configuration file at `path` (qseed's TOML, or Qrypt's
/// qseed's YAML, told apart by content), with `QSEED_<TABLE>_<KEY>` overrides from the
/// environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let fail = |message: String| ConfigError {
        path: path.to_path_buf(),
        message,
    };
    let (text, _) = crate::files::read_text(path, crate::files::CONFIG_LIMIT).map_err(|e| {
        fail(if e.is_not_found() && path == Path::new(DEFAULT_PATH) {
            format!(
                "the file does not exist (nor does Qrypt's qseed's {}); write one (see \
                 examples/qseed.toml, or `qseed migrate` for an old YAML file) or name another \
                 with --config or QSEED_CONFIG_FILE",
                legacy::DEFAULT_PATH
            )
        } else if e.is_not_found() {
            "the file does not exist; write one (see examples/qseed.toml) or name another with \
             --config or QSEED_CONFIG_FILE"
                .to_string()
        } else {
            format!("cannot read the configuration file: {e}")
        })
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    refuse_if_others_can_write(path, "the configuration file").map_err(fail)?;
    let config = parse_from(&text, base, environment()).map_err(fail)?;
    if config.legacy {
        tracing::warn!(
            "{} is Qrypt's qseed's YAML format and holds the API token{} inline: anyone who \
             can read the file has them. `qseed migrate {} --write DIR` moves them into files \
             of their own",
            path.display(),
            if config.targets.iter().any(|t| t.login.is_some()) {
                " and the HSM PIN"
            } else {
                ""
            },
            path.display()
        );
    }
    Ok(config)
}

/// Qrypt's qseed configuration beside `config_path` (as an installation over Qrypt's
/// package leaves it) that this configuration does not come from: qseed does not read it,
/// which the operator must be told rather than find out (issue 22, item 8). A configuration
/// that `qseed migrate` wrote from it says so in its first line, and is not warned about.
pub fn unread_legacy_beside(config_path: &Path) -> Option<PathBuf> {
    let legacy = config_path.parent()?.join("qseed_config.yml");
    if legacy == config_path || !legacy.is_file() {
        return None;
    }
    let (text, _) = crate::files::read_text(config_path, crate::files::CONFIG_LIMIT).ok()?;
    if legacy::looks_like_yaml(&text) {
        return None;
    }
    let migrated = text
        .lines()
        .next()
        .is_some_and(|l| l.contains("migrated by qseed") && l.contains("qseed_config.yml"));
    (!migrated).then_some(legacy)
}

/// What to tell about [`unread_legacy_beside`]'s file.
pub fn unread_legacy_advice(legacy: &Path, config_path: &Path) -> String {
    format!(
        "{} (Qrypt's qseed configuration, with its API token and PIN) is not read: qseed reads \
         {}. To carry it over: `sudo qseed migrate {} --write {}` (under the package it \
         replaces the untouched packaged qseed.toml and moves the token and PIN into \
         /etc/qseed/qrypt.token and /etc/qseed/hsm.pin), then `sudo systemctl restart qseed`; \
         or delete it once it is no longer needed",
        legacy.display(),
        config_path.display(),
        legacy.display(),
        config_path
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    )
}

/// Parses and resolves configuration text; relative paths are taken from `base`. Environment
/// overrides apply, as for [`load`].
pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
    parse_from(text, base, environment())
}

/// The process's `QSEED_*` variables (a variable that is not Unicode cannot be a key's value).
fn environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("QSEED_"))
        .collect()
}

/// [`parse`] with the environment `vars`.
pub fn parse_from(text: &str, base: &Path, vars: Vec<(String, String)>) -> Result<Config, String> {
    let legacy = legacy::looks_like_yaml(text);
    let mut raw: RawConfig = if legacy {
        legacy::parse(text)
            .map_err(|e| format!("{e} (read as Qrypt's qseed YAML configuration)"))?
            .into_raw()
    } else {
        toml::from_str(text).map_err(|e| toml_error(text, &e))?
    };
    let overrides = env::apply(&mut raw, vars)?;
    let mut config = resolve(raw, base).map_err(|e| env::rename(e, &overrides))?;
    config.overrides = overrides;
    config.legacy = legacy;
    Ok(config)
}

/// toml's own `Display` quotes the offending line, which may hold a PIN: give the position and
/// toml's message only.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end_matches('\n');
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_string(),
    }
}

impl Config {
    /// The first of the Qrypt API sources (the only source of most configurations).
    pub fn qrypt(&self) -> Option<&SourceConfig> {
        self.sources.iter().find_map(|s| match &s.kind {
            SourceSpecKind::Qrypt(config) => Some(config.as_ref()),
            SourceSpecKind::Device(_) => None,
        })
    }
}

fn resolve_sources(
    mut raw: raw::RawSources,
    pool: &RawPool,
    base: &Path,
) -> Result<(Vec<SourceSpec>, crate::source::set::Mode), String> {
    if raw.list.is_empty() {
        raw.list.push(RawSource::default());
    }
    let several = raw.list.len() > 1;
    let mut sources: Vec<SourceSpec> = Vec::with_capacity(raw.list.len());
    for (index, raw_source) in raw.list.into_iter().enumerate() {
        let spec = resolve_one_source(raw_source, base, index, several)?;
        if sources.iter().any(|s| s.name == spec.name) {
            return Err(format!(
                "two sources are named {:?}; give each [[source]] its own name",
                spec.name
            ));
        }
        // Two sources reading one file would each keep its own read position: the same
        // bytes twice.
        if let SourceSpecKind::Device(device) = &spec.kind {
            let file = std::fs::canonicalize(&device.path).unwrap_or(device.path.clone());
            if let Some(other) = sources.iter().find(|s| match &s.kind {
                SourceSpecKind::Device(d) => {
                    std::fs::canonicalize(&d.path).unwrap_or(d.path.clone()) == file
                }
                SourceSpecKind::Qrypt(_) => false,
            }) {
                return Err(format!(
                    "sources {:?} and {:?} read the same file {}; read it from one source",
                    other.name,
                    spec.name,
                    device.path.display()
                ));
            }
        }
        sources.push(spec);
    }
    use crate::source::set::Mode;
    let mode = match (pool.sources, pool.mix_fallback) {
        (None | Some(raw::SourcesMode::Failover), None) => Mode::Failover,
        (None | Some(raw::SourcesMode::Failover), Some(_)) => {
            return Err(
                "pool.mix_fallback applies to pool.sources = \"mix\" only; remove it, \
                        or set pool.sources = \"mix\""
                    .into(),
            )
        }
        (Some(raw::SourcesMode::Mix), fallback) => Mode::Mix {
            fallback: fallback == Some(raw::MixFallback::Failover),
        },
    };
    if matches!(mode, Mode::Mix { .. }) && sources.len() < 2 {
        return Err(format!(
            "pool.sources = \"mix\" XORs the bytes of at least two sources, and {} is \
             configured; add [[source]] tables, or use pool.sources = \"failover\"",
            sources.len()
        ));
    }
    Ok((sources, mode))
}

fn resolve_one_source(
    raw: RawSource,
    base: &Path,
    index: usize,
    several: bool,
) -> Result<SourceSpec, String> {
    let label = match (&raw.name, several) {
        (Some(name), _) => format!("source {name:?}"),
        (None, true) => format!("source #{}", index + 1),
        (None, false) => "source".to_string(),
    };
    if let Some(name) = &raw.name {
        if !valid_name(name) {
            return Err(format!(
                "{label}: name = {name:?}; use letters, digits, '.', '_' and '-' only (it \
                 appears in logs and metrics)"
            ));
        }
    }
    match raw.kind.unwrap_or_default() {
        raw::SourceKind::Device => {
            let api_keys: Vec<&str> = [
                ("url", raw.url.is_some()),
                ("dialect", raw.dialect.is_some()),
                ("block_unit", raw.block_unit.is_some()),
                ("auth", raw.auth.is_some()),
                ("token_file", raw.token_file.is_some()),
                ("ca_file", raw.ca_file.is_some()),
                ("allow_http", raw.allow_http.is_some()),
                ("allow_simulated", raw.allow_simulated.is_some()),
                ("monthly_budget", raw.monthly_budget.is_some()),
                ("proxy", raw.proxy.is_some()),
            ]
            .into_iter()
            .filter_map(|(key, set)| set.then_some(key))
            .collect();
            if !api_keys.is_empty() {
                return Err(format!(
                    "{label}: kind = \"device\" takes path and timeout; {} belong(s) to \
                     kind = \"qrypt\"",
                    api_keys.join(", ")
                ));
            }
            let path = raw.path.ok_or_else(|| {
                format!(
                    "{label}: kind = \"device\" needs path, the file or device to read \
                     (e.g. path = \"/dev/qrandom0\")"
                )
            })?;
            let path = absolute(base, &path);
            crate::source::device::DeviceSource::check(&path)
                .map_err(|e| format!("{label}: path: {e}"))?;
            let timeout = match raw.timeout {
                Some(t) => in_range(&format!("{label}: timeout"), t.0, &TIMEOUT_RANGE)?,
                None => DEFAULT_TIMEOUT,
            };
            let name = raw.name.unwrap_or_else(|| {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| valid_name(n))
                    .unwrap_or_else(|| "device".into())
            });
            Ok(SourceSpec {
                name,
                kind: SourceSpecKind::Device(crate::source::device::DeviceConfig { path, timeout }),
            })
        }
        raw::SourceKind::Qrypt => {
            if raw.path.is_some() {
                return Err(format!(
                    "{label}: path belongs to kind = \"device\"; a Qrypt API source takes url"
                ));
            }
            let name = raw.name.clone();
            let config = resolve_source(raw, base).map_err(|e| {
                if several {
                    format!("{label}: {e}")
                } else {
                    e
                }
            })?;
            let name = name.unwrap_or_else(|| {
                config
                    .url
                    .host_str()
                    .map(str::to_string)
                    .filter(|n| valid_name(n))
                    .unwrap_or_else(|| "api".into())
            });
            Ok(SourceSpec {
                name,
                kind: SourceSpecKind::Qrypt(Box::new(config)),
            })
        }
    }
}

fn resolve(raw: RawConfig, base: &Path) -> Result<Config, String> {
    let (sources, source_mode) = resolve_sources(raw.source, &raw.pool, base)?;
    let RawService {
        state_dir,
        log_repeat,
    } = raw.service;
    let state_dir = state_dir.map(|dir| absolute(base, &dir));
    let log_repeat = match log_repeat {
        None => crate::repeat::DEFAULT_LOG_REPEAT,
        Some(d) => in_range("service.log_repeat", d.0, &crate::repeat::LOG_REPEAT_RANGE)?,
    };
    let pool = resolve_pool(raw.pool)?;
    let telemetry_listen = match raw.telemetry.listen.as_deref() {
        None => Some(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            DEFAULT_TELEMETRY_PORT,
        ))),
        Some("off") => None,
        Some(text) => Some(listen_address(text).ok_or_else(|| {
            format!(
                "telemetry.listen = {text:?} is not an address; write it like \
                 \"127.0.0.1:9750\", \"localhost:9750\", \"[::1]:9750\", \":9750\" (every \
                 interface), or \"off\""
            )
        })?),
    };
    let mut targets = Vec::with_capacity(raw.targets.len());
    let mut names = HashSet::new();
    let mut tokens = HashSet::new();
    for (index, raw_target) in raw.targets.into_iter().enumerate() {
        let target = resolve_target(raw_target, index, base)?;
        if !names.insert(target.name.clone()) {
            return Err(format!(
                "two targets are named {:?}; give each [[target]] its own name",
                target.name
            ));
        }
        if let Some(other) = targets
            .iter()
            .find(|t: &&TargetConfig| t.module == target.module && t.init_args != target.init_args)
        {
            return Err(format!(
                "targets {:?} and {:?} use module {} with different init_args; a module is \
                 initialized once, so give them the same",
                other.name,
                target.name,
                target.module.display()
            ));
        }
        if target.kind != TargetKind::Pkcs11
            && targets
                .iter()
                .any(|t: &TargetConfig| t.kind != TargetKind::Pkcs11)
        {
            return Err(format!(
                "target {:?} is a second kind = \"kernel\" target; one is enough (give it the \
                 size and period you want)",
                target.name
            ));
        }
        // Two paths to one module file (a symlink) are one module.
        let module_file = std::fs::canonicalize(&target.module).unwrap_or(target.module.clone());
        if !tokens.insert((module_file, target.token.clone())) {
            return Err(format!(
                "target {:?} names the same token ({} of {}) as an earlier target; \
                 seed each token from one target",
                target.name,
                target.token,
                target.module.display()
            ));
        }
        targets.push(target);
    }
    let audit_signing = resolve_audit(raw.audit, &targets)?;
    Ok(Config {
        sources,
        source_mode,
        pool,
        telemetry_listen,
        state_dir,
        log_repeat,
        targets,
        overrides: Vec::new(),
        legacy: false,
        audit_signing,
    })
}

fn resolve_audit(
    raw: raw::RawAudit,
    targets: &[TargetConfig],
) -> Result<Option<AuditSigning>, String> {
    let Some(target) = raw.sign_with else {
        if raw.key_label.is_some() || raw.sign_every.is_some() {
            return Err(
                "audit.key_label and audit.sign_every need audit.sign_with = \"<target name>\" \
                 (the target whose token holds the signing key)"
                    .into(),
            );
        }
        return Ok(None);
    };
    match targets.iter().find(|t| t.name == target) {
        None => {
            return Err(format!(
                "audit.sign_with = {target:?} names no target; name the [[target]] whose token \
                 holds the signing key"
            ))
        }
        Some(t) if t.kind != TargetKind::Pkcs11 => {
            return Err(format!(
                "audit.sign_with = {target:?} is a kernel target; name a PKCS#11 target"
            ))
        }
        Some(_) => {}
    }
    let key_label = raw
        .key_label
        .unwrap_or_else(|| DEFAULT_AUDIT_KEY_LABEL.to_string());
    if key_label.is_empty() {
        return Err("audit.key_label is empty; give the signing key's label".into());
    }
    let every = match raw.sign_every {
        None => DEFAULT_SIGN_EVERY,
        Some(d) => in_range(
            "audit.sign_every",
            d.0,
            &(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)),
        )?,
    };
    Ok(Some(AuditSigning {
        target,
        key_label,
        every,
    }))
}

fn resolve_pool(raw: RawPool) -> Result<PoolConfig, String> {
    let defaults = PoolConfig::default();
    let max_bytes = match raw.max_bytes {
        None => defaults.max_bytes,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| MAX_BYTES_RANGE.contains(n))
            .ok_or_else(|| {
                format!(
                    "pool.max_bytes = {n} is out of range: allowed {}..={} bytes",
                    MAX_BYTES_RANGE.start(),
                    MAX_BYTES_RANGE.end()
                )
            })?,
    };
    let max_age = match raw.max_age {
        None => defaults.max_age,
        Some(d) => in_range("pool.max_age", d.0, &MAX_AGE_RANGE)?,
    };
    let horizon = match raw.horizon {
        None => defaults.horizon,
        Some(d) => in_range("pool.horizon", d.0, &HORIZON_RANGE)?,
    };
    let flush_timeout = match raw.flush_timeout {
        None => defaults.flush_timeout,
        Some(d) => in_range("pool.flush_timeout", d.0, &FLUSH_TIMEOUT_RANGE)?,
    };
    let min_entropy = match raw.min_entropy {
        None => defaults.health.min_entropy,
        Some(h) if h > crate::pool::health::MIN_ENTROPY_FLOOR && h <= 8.0 => h,
        Some(h) => {
            return Err(format!(
                "pool.min_entropy = {h} is out of range: allowed above 0.5 up to 8 bits per byte"
            ))
        }
    };
    let false_alarm = match raw.false_alarm {
        None => defaults.health.false_alarm,
        Some(a) if crate::pool::health::FALSE_ALARM_RANGE.contains(&a) => a,
        Some(a) => {
            let a = if a.abs() < 1e-4 {
                format!("{a:e}")
            } else {
                a.to_string()
            };
            return Err(format!(
                "pool.false_alarm = {a} is out of range: allowed 2^-64 (5.4e-20) up to 2^-20 \
                 (9.5e-7); SP 800-90B suggests 2^-20 to 2^-40. It is the chance of throwing a \
                 good block away: a smaller value makes the tests more tolerant, not stricter"
            ));
        }
    };
    Ok(PoolConfig {
        max_bytes,
        max_age,
        horizon,
        health: HealthConfig {
            min_entropy,
            false_alarm,
        },
        flush_timeout,
    })
}

fn resolve_source(raw: RawSource, base: &Path) -> Result<SourceConfig, String> {
    let url_text = raw.url.as_deref().unwrap_or(DEFAULT_URL);
    let url = Url::parse(url_text).map_err(|e| {
        format!(
            "source.url = {url_text:?} is not a URL ({e}); write it like \"https://api-eus.qrypt.com\""
        )
    })?;
    let allow_http = raw.allow_http.unwrap_or(false);
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(format!(
                "source.url = {url_text:?} is plain HTTP: the token and the entropy would cross \
                 the network unencrypted. Use https://, or set source.allow_http = true for an \
                 appliance on a network you trust"
            ))
        }
        other => {
            return Err(format!(
                "source.url = {url_text:?} has scheme {other:?}; use https://"
            ))
        }
    }
    // qseed adds the endpoint's path itself: a pasted endpoint would be asked for twice
    // (".../api/v1/entropy/api/v1/entropy", a bare 404).
    if let Some(at) = url.path().find("/api/v1") {
        let mut base = url.clone();
        base.set_path(&url.path()[..at]);
        return Err(format!(
            "source.url = {url_text:?} names an endpoint ({}); source.url is the API's base URL, \
             and qseed adds /api/v1/... itself: write {:?}",
            &url.path()[at..],
            base.as_str().trim_end_matches('/')
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("source.url must not hold a user name or password; \
                    put the API token in source.token_file or QRYPT_TOKEN"
            .into());
    }
    let timeout = match raw.timeout {
        Some(t) => in_range("source.timeout", t.0, &TIMEOUT_RANGE)?,
        None => DEFAULT_TIMEOUT,
    };
    let auth = raw.auth.unwrap_or(Auth::Bearer);
    let token = match (auth, raw.token_file) {
        (Auth::None, Some(_)) => {
            return Err(
                "source.auth = \"none\" and source.token_file are both set; \
                        remove one"
                    .into(),
            )
        }
        (Auth::None, None) => None,
        (Auth::Bearer, Some(file)) => {
            let file = secret_path(base, &file, "source.token_file")?;
            Some(read_secret_file(&file, "source.token_file")?)
        }
        (Auth::Bearer, None) if raw.inline_token.is_some() => raw.inline_token.map(|t| t.0),
        (Auth::Bearer, None) => match std::env::var(TOKEN_ENV).map(zeroize::Zeroizing::new) {
            Ok(t) if !t.trim().is_empty() => Some(SecretString::from(t.trim().to_string())),
            _ => {
                return Err(format!(
                    "no API token: set source.token_file to a file holding the token, or the \
                     environment variable {TOKEN_ENV} (for an appliance without authentication: \
                     source.auth = \"none\")"
                ))
            }
        },
    };
    let dialect = raw.dialect.unwrap_or_default();
    if dialect != crate::source::Dialect::Entropy
        && raw
            .block_unit
            .is_some_and(|u| u != crate::source::block_unit::BlockUnit::Auto)
    {
        return Err(format!(
            "source.block_unit applies to dialect = \"entropy\" (POST /api/v1/entropy) only; \
             dialect = \"{}\" asks by KiB already. Remove block_unit",
            dialect.as_str()
        ));
    }
    Ok(SourceConfig {
        url,
        dialect,
        block_unit: raw.block_unit.unwrap_or_default(),
        token,
        ca_file: match raw.ca_file {
            Some(f) => {
                let path = secret_path(base, &f, "source.ca_file")?;
                refuse_if_others_can_write(&path, "source.ca_file")?;
                Some(path)
            }
            None => None,
        },
        timeout,
        allow_http,
        allow_simulated: raw.allow_simulated.unwrap_or(false),
        monthly_budget: match raw.monthly_budget {
            Some(values::ByteCount(0)) => {
                return Err(
                    "source.monthly_budget = 0: give the bytes the source may sell per \
                            month (\"100MiB\"), or leave it out"
                        .into(),
                )
            }
            budget => budget.map(|b| b.0),
        },
        proxy: match raw.proxy.as_deref().map(str::trim) {
            None => ProxySetting::Environment,
            Some("none") => ProxySetting::Off,
            Some(value) => {
                ProxySetting::Url(crate::source::proxy::parse_proxy(value, "source.proxy")?)
            }
        },
    })
}

fn resolve_target(mut raw: RawTarget, index: usize, base: &Path) -> Result<TargetConfig, String> {
    let name = match raw.name.take() {
        Some(n) if valid_name(&n) => n,
        Some(n) => {
            return Err(format!(
                "target #{} has name = {n:?}; use letters, digits, '.', '_' and '-' only \
                 (it appears in logs)",
                index + 1
            ))
        }
        None => {
            return Err(format!(
                "target #{} has no name; add name = \"...\" (it appears in logs)",
                index + 1
            ))
        }
    };
    let at = |message: String| format!("target {name:?}: {message}");
    if raw.kind == Some(raw::TargetKind::Kernel) {
        return resolve_kernel_target(raw, name);
    }
    if raw.credit.is_some() {
        return Err(at(
            "credit applies to kind = \"kernel\" only (a PKCS#11 token is not told how much \
             entropy a seed carries); remove it"
                .into(),
        ));
    }
    let uri = match &raw.token {
        Some(text) => Some(uri::Pkcs11Uri::parse(text).map_err(|e| at(format!("token: {e}")))?),
        None => None,
    };
    if let Some(label) = &raw.token_label {
        if label.starts_with("pkcs11:") {
            return Err(at(
                "token_label holds a PKCS#11 URI; write it as token = \"pkcs11:...\" (a label \
                 is matched literally)"
                    .into(),
            ));
        }
    }
    let uri_module = match &uri {
        Some(u) => match (&u.module_path, &u.module_name) {
            (Some(_), Some(_)) => {
                return Err(at(
                    "token: the URI gives both module-path and module-name; keep one".into(),
                ))
            }
            (Some(path), None) => Some(PathBuf::from(path)),
            (None, Some(name)) => Some(p11kit::resolve(name).map_err(&at)?),
            (None, None) => None,
        },
        None => None,
    };
    let module = match (raw.module, uri_module) {
        (Some(m), Some(u)) => {
            let m = resolve_module(base, &m).map_err(&at)?;
            if m != u {
                return Err(at(format!(
                    "module = {:?} but the token URI names module {:?}; keep one",
                    m.display().to_string(),
                    u.display().to_string()
                )));
            }
            m
        }
        (Some(m), None) => resolve_module(base, &m).map_err(&at)?,
        (None, Some(u)) => u,
        (None, None) => {
            return Err(at(
                "no module; set module = the path of the HSM vendor's PKCS#11 library, \
                 e.g. \"/usr/lib/softhsm/libsofthsm2.so\" (or a p11-kit module name)"
                    .into(),
            ))
        }
    };

    refuse_if_others_can_write(&module, "module").map_err(&at)?;
    let token = match (raw.token_label, raw.serial, raw.slot_id, uri.clone()) {
        (Some(label), None, None, None) if label.trim().is_empty() => {
            // An empty label matches an uninitialized token.
            return Err(at("token_label is empty; give the token's label".into()));
        }
        (None, Some(serial), None, None) if serial.trim().is_empty() => {
            return Err(at("serial is empty; give the token's serial".into()));
        }
        (Some(label), None, None, None) => TokenSelector::Label(label),
        (None, Some(serial), None, None) => TokenSelector::Serial(serial),
        (None, None, Some(id), None) => TokenSelector::SlotId(u64::try_from(id).map_err(|_| {
            at(format!(
                "slot_id = {id} is negative; `qseed slots --module ...` lists the slot ids"
            ))
        })?),
        (None, None, None, Some(uri)) => TokenSelector::Uri(uri),
        (None, None, None, None) => {
            return Err(at(
                "no token given; set one of token (a pkcs11: URI), token_label, serial or \
                 slot_id (`qseed slots --module ...` lists them)"
                    .into(),
            ))
        }
        _ => {
            return Err(at(
                "more than one of token, token_label, serial and slot_id is set; keep one".into(),
            ))
        }
    };

    // The URI's pin-source / pin-value are PIN sources like the keys.
    let (mut pin_file, mut pin) = (raw.pin_file, raw.pin);
    if let Some(u) = &uri {
        if u.pin_source.is_some() || u.pin_value().is_some() {
            if pin_file.is_some() || raw.pin_env.is_some() || pin.is_some() {
                return Err(at(
                    "the token URI gives a PIN (pin-source or pin-value) and so does pin_file, \
                     pin_env or pin; keep one"
                        .into(),
                ));
            }
            if let Some(source) = &u.pin_source {
                let path = source.strip_prefix("file:").unwrap_or(source);
                if source.contains("://") || path.is_empty() {
                    return Err(at(format!(
                        "token: pin-source {source:?} is not a file; write pin-source=file:PATH"
                    )));
                }
                pin_file = Some(PathBuf::from(path));
            }
            pin = u.pin_value().map(values::InlineSecret);
        }
    }
    let pin = resolve_pin(&pin_file, &raw.pin_env, pin, base).map_err(&at)?;
    let login = match (raw.login, pin) {
        (Some(Login::User), Some(pin)) => Some(pin),
        (Some(Login::User), None) => {
            return Err(at(
                "login = \"user\" needs a PIN; set pin_file, pin_env or pin".into(),
            ))
        }
        (Some(Login::None), Some(_)) => {
            return Err(at(
                "a PIN is set but login = \"none\"; remove the PIN or set login = \"user\"".into(),
            ))
        }
        (None, Some(pin)) => Some(pin),
        (Some(Login::None), None) | (None, None) => None,
    };

    let (size, period, offset, timeout) =
        resolve_timing(raw.size, raw.period, raw.offset, raw.timeout).map_err(&at)?;
    let max_seed = match raw.max_seed {
        None => None,
        Some(m) => Some(
            usize::try_from(m)
                .ok()
                .filter(|m| SIZE_RANGE.contains(m))
                .ok_or_else(|| {
                    at(format!(
                        "max_seed = {m} is out of range: allowed {}..={} bytes per C_SeedRandom \
                         call",
                        SIZE_RANGE.start(),
                        SIZE_RANGE.end()
                    ))
                })?,
        ),
    };
    if raw.init_args.as_deref().is_some_and(|a| a.contains('\0')) {
        return Err(at("init_args holds a NUL character".into()));
    }
    Ok(TargetConfig {
        name,
        kind: TargetKind::Pkcs11,
        module,
        token,
        login,
        size,
        period,
        offset,
        timeout,
        max_seed,
        init_args: raw.init_args,
        check_output: raw.check_output.unwrap_or(false),
    })
}

/// `kind = "kernel"`: the PKCS#11 keys do not apply; the timing keys do.
fn resolve_kernel_target(raw: RawTarget, name: String) -> Result<TargetConfig, String> {
    let at = |message: String| format!("target {name:?}: {message}");
    let pkcs11_keys: Vec<&str> = [
        ("module", raw.module.is_some()),
        ("token", raw.token.is_some()),
        ("token_label", raw.token_label.is_some()),
        ("slot_id", raw.slot_id.is_some()),
        ("serial", raw.serial.is_some()),
        ("login", raw.login.is_some()),
        ("pin_file", raw.pin_file.is_some()),
        ("pin_env", raw.pin_env.is_some()),
        ("pin", raw.pin.is_some()),
        ("max_seed", raw.max_seed.is_some()),
        ("init_args", raw.init_args.is_some()),
        ("check_output", raw.check_output.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    if !pkcs11_keys.is_empty() {
        return Err(at(format!(
            "kind = \"kernel\" takes size, period, offset, timeout and credit; {} belong(s) to \
             PKCS#11 targets",
            pkcs11_keys.join(", ")
        )));
    }
    let (size, period, offset, timeout) =
        resolve_timing(raw.size, raw.period, raw.offset, raw.timeout).map_err(&at)?;
    Ok(TargetConfig {
        name,
        kind: TargetKind::Kernel {
            credit: raw.credit.unwrap_or_default(),
        },
        module: PathBuf::new(),
        token: TokenSelector::Label(String::new()),
        login: None,
        size,
        period,
        offset,
        timeout,
        max_seed: None,
        init_args: None,
        check_output: false,
    })
}

/// A target's size, period, offset and timeout, checked.
fn resolve_timing(
    size: Option<i64>,
    period: Option<values::DurationValue>,
    offset: Option<values::DurationValue>,
    timeout: Option<values::DurationValue>,
) -> Result<(usize, Duration, Duration, Duration), String> {
    let raw = RawTiming {
        size,
        period,
        offset,
        timeout,
    };
    let at = |m: String| m;
    let size = match raw.size {
        None => DEFAULT_SIZE,
        Some(s) => usize::try_from(s)
            .ok()
            .filter(|s| SIZE_RANGE.contains(s))
            .ok_or_else(|| {
                at(format!(
                    "size = {s} is out of range: allowed {}..={} bytes per injection",
                    SIZE_RANGE.start(),
                    SIZE_RANGE.end()
                ))
            })?,
    };
    let period = match raw.period {
        None => DEFAULT_PERIOD,
        Some(p) => in_range("period", p.0, &PERIOD_RANGE).map_err(&at)?,
    };
    let offset = match raw.offset {
        None => Duration::ZERO,
        Some(o) if o.0 < period => o.0,
        Some(o) => {
            return Err(at(format!(
                "offset = {} is out of range: allowed 0s up to (not including) period = {}",
                short_duration(o.0),
                short_duration(period)
            )))
        }
    };
    let timeout = match raw.timeout {
        None => DEFAULT_CALL_TIMEOUT,
        Some(t) => in_range("timeout", t.0, &TIMEOUT_RANGE).map_err(&at)?,
    };
    Ok((size, period, offset, timeout))
}

struct RawTiming {
    size: Option<i64>,
    period: Option<values::DurationValue>,
    offset: Option<values::DurationValue>,
    timeout: Option<values::DurationValue>,
}

/// The PIN and where it comes from. A reload compares both: a target whose PIN and source
/// are unchanged keeps its session, however its files were touched.
fn resolve_pin(
    pin_file: &Option<PathBuf>,
    pin_env: &Option<String>,
    pin: Option<values::InlineSecret>,
    base: &Path,
) -> Result<Option<UserLogin>, String> {
    let (pin, described) = match (pin_file, pin_env, pin) {
        (None, None, None) => return Ok(None),
        (Some(file), None, None) => {
            let path = secret_path(base, file, "pin_file")?;
            let pin = read_secret_file(&path, "pin_file")?;
            (pin, format!("pin_file {:?}", file.display().to_string()))
        }
        (None, Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => (SecretString::from(v), format!("pin_env {var:?}")),
            _ => {
                return Err(format!(
                    "pin_env = {var:?} but that environment variable is not set or empty"
                ))
            }
        },
        (None, None, Some(inline)) => (inline.0, "pin (inline)".to_string()),
        _ => return Err("more than one of pin_file, pin_env and pin is set; keep one".into()),
    };
    {
        use secrecy::ExposeSecret;
        let text = pin.expose_secret();
        // Each of these would cost a login attempt, and HSMs count them.
        if text.is_empty() {
            return Err(format!("{described} is empty; give the user PIN"));
        }
        if text.trim() != text {
            return Err(format!(
                "{described} begins or ends with a space or tab (value not shown): a PIN with \
                 stray blanks would be refused by the token and count as a wrong PIN. Remove them"
            ));
        }
    }
    Ok(Some(UserLogin {
        pin,
        source: PinSource { described },
    }))
}

/// Reads a one-line secret file. A trailing newline is not part of the secret.
fn read_secret_file(path: &Path, key: &str) -> Result<SecretString, String> {
    let shown = path.display().to_string();
    let (bytes, _) = crate::files::read_bounded(path, crate::files::SECRET_LIMIT)
        .map_err(|e| format!("{key} = {shown:?} cannot be read: {e}"))?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{key} = {shown:?} is not UTF-8 text"))?;
    // A NUL ends a C string: the module would see a shorter PIN than the file holds, and
    // count a wrong one. Refused before any login, value not shown.
    if text.contains('\0') {
        return Err(format!(
            "{key} = {shown:?} holds a NUL byte (value not shown); write the secret as one \
             line of text"
        ));
    }
    // A token never holds blanks: trimmed as QRYPT_TOKEN is. A PIN keeps them, for the
    // caller to refuse. Only the first line is the secret (a second line, a comment or an
    // editor's trailing lines, would otherwise be sent as part of it).
    let first_line = text.split('\n').next().unwrap_or_default();
    let secret = if key.ends_with("token_file") {
        first_line.trim()
    } else {
        first_line.trim_end_matches('\r')
    };
    if secret.is_empty() {
        return Err(if credentials_dir().is_some_and(|d| path.starts_with(d)) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            format!(
                "{key} = \"credential:{name}\" is empty: systemd passed an empty credential, \
                 which happens when the file its LoadCredential= line names is missing (the \
                 unit's SetCredential= default is empty). Create /etc/qseed/{name} (mode 0600, \
                 owned by root; the packaged unit loads credential {name} from it, see \
                 `systemctl cat qseed`), then `systemctl restart qseed`; or remove {key} from \
                 the configuration"
            )
        } else {
            format!("{key} = {shown:?} is empty")
        });
    }
    warn_if_readable_by_others(path, key);
    refuse_if_others_can_write(path, key)?;
    Ok(SecretString::from(secret.to_string()))
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "{key} {} is readable by every user on this machine; run: chmod o-rwx {}",
                path.display(),
                path.display()
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path, _: &str) {}

/// The documented opt-out of [`refuse_if_others_can_write`] (see [`crate::trust`]).
pub const ALLOW_WRITABLE_ENV: &str = crate::trust::ALLOW_ENV;

/// sshd-style strictness: a file (the configuration, a module qseed will run, a secret, a
/// trust anchor) that a user other than root or qseed's own could change, itself or through a
/// folder on the way to it, hands qseed to that user. Refused unless
/// `QSEED_ALLOW_WRITABLE_FILES=1` (see [`crate::trust`]).
pub fn refuse_if_others_can_write(path: &Path, key: &str) -> Result<(), String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    // Devices and pipes are world-writable by nature; what is wrong with them is what they are.
    if !meta.is_file() {
        return Err(format!(
            "{key} {} cannot be used: it is {}, not a regular file; name a regular file",
            path.display(),
            crate::files::kind_of(meta.file_type())
        ));
    }
    crate::trust::check(path, key)
}

fn in_range(
    key: &str,
    value: Duration,
    range: &std::ops::RangeInclusive<Duration>,
) -> Result<Duration, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{key} = {} is out of range: allowed {} to {}",
            short_duration(value),
            short_duration(*range.start()),
            short_duration(*range.end())
        ))
    }
}

/// A listening address as operators write them: `127.0.0.1:9750`, `[::1]:9750`,
/// `localhost:9750` (loopback, without asking DNS) and `:9750` (every interface, as
/// node_exporter writes it).
fn listen_address(text: &str) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, SocketAddr};
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    match host {
        "" => Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
        "localhost" => Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        _ => None,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A secret file's path: `credential:NAME` is the credential NAME that systemd passed with
/// `LoadCredential=` (in `$CREDENTIALS_DIRECTORY`); anything else is a path, relative to the
/// configuration file's folder.
fn secret_path(base: &Path, path: &Path, key: &str) -> Result<PathBuf, String> {
    let Some(name) = path.to_str().and_then(|p| p.strip_prefix("credential:")) else {
        return Ok(absolute(base, path));
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "{key} = \"credential:{name}\" needs a credential name without '/', as in \
             LoadCredential=NAME:PATH"
        ));
    }
    match credentials_dir() {
        Some(dir) => Ok(dir.join(name)),
        None => Err(format!(
            "{key} = \"credential:{name}\" but CREDENTIALS_DIRECTORY is not set: run qseed from \
             a systemd unit with LoadCredential={name}:/path/to/file, or give a file path"
        )),
    }
}

/// A `module`: a path (relative to the configuration's folder), or a p11-kit module name
/// (no `/`, not ending in `.so`), resolved through p11-kit's registered `.module` files.
pub fn resolve_module(base: &Path, module: &Path) -> Result<PathBuf, String> {
    let text = module.to_string_lossy();
    if !text.contains('/') && !text.contains(".so") {
        return p11kit::resolve(&text);
    }
    Ok(absolute(base, module))
}

fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests;
