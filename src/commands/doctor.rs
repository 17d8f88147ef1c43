//! `qseed doctor`: checks a configuration the way a support engineer would, and prints a
//! checklist with the fix for each failure. Exit 0 only when every check passes.
//!
//! It makes one minimal request to the API (enough for one seed per target) and uses those
//! bytes for the seeding checks, so nothing bought is wasted. Each login is tried once.

use std::path::Path;
use std::sync::Arc;

use crate::config::{self, Config};
use crate::error::Error;
use crate::hsm::{token, HsmError, Modules, PinGuard, Target};
use crate::pool::{EntropyBytes, Pool};
use crate::source::set::SourceSet;
use crate::source::EntropySource;

#[derive(Debug, Default)]
struct Checklist {
    failures: usize,
    warnings: usize,
}

impl Checklist {
    fn ok(&mut self, what: &str) {
        say!("[ ok ] {what}");
    }

    fn warn(&mut self, what: &str, fix: &str) {
        self.warnings += 1;
        say!("[warn] {what}\n       fix: {fix}");
    }

    fn fail(&mut self, what: &str, why: &str) {
        self.failures += 1;
        say!("[FAIL] {what}\n       {why}");
    }
}

pub async fn doctor(config_path: &Path, retry_pin: Option<&str>) -> Result<(), Error> {
    let mut list = Checklist::default();
    let config = match config::load(config_path) {
        Ok(c) => {
            list.ok(&format!(
                "configuration {}: valid, {} target(s)",
                config_path.display(),
                c.targets.len()
            ));
            c
        }
        Err(e) => {
            list.fail(
                &format!("configuration {}", config_path.display()),
                &e.message,
            );
            return Err(Error::Config(
                "the configuration is not usable; see above".into(),
            ));
        }
    };
    if let Some(name) = retry_pin {
        if !config.targets.iter().any(|t| t.name == name) {
            let names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::Config(format!(
                "--retry-pin {name}: the configuration has no target of that name (targets: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
    }
    check_permissions(&mut list, config_path, &config);
    if let Some(legacy) = config::unread_legacy_beside(config_path) {
        list.warn(
            &format!("{} is not read", legacy.display()),
            &config::unread_legacy_advice(&legacy, config_path),
        );
    }
    check_telemetry(&mut list, &config).await;
    for o in &config.overrides {
        list.ok(&format!(
            "environment: {} sets {} = {:?}",
            o.variable, o.key, o.value
        ));
    }
    if config.legacy {
        list.warn(
            &format!(
                "configuration {} is Qrypt's qseed YAML, with the API token{} inline",
                config_path.display(),
                if config.targets.iter().any(|t| t.login.is_some()) {
                    " and the HSM PIN"
                } else {
                    ""
                }
            ),
            &format!(
                "run `qseed migrate {} --write DIR`: qseed's TOML, the secrets in files of their \
                 own (0600)",
                config_path.display()
            ),
        );
    }
    let guard = super::run::pin_guard(&config);
    if config.targets.iter().any(|t| t.login.is_some()) {
        match guard.describe() {
            Ok(folder) => list.ok(&format!(
                "PIN guard: refused PINs are recorded in {folder}; qseed runs as {}",
                crate::hsm::quirks::running_user()
            )),
            Err(why) => list.fail(
                "PIN guard",
                &format!(
                    "{why}; every login is refused until attempts can be recorded. Set \
                     [service] state_dir to a folder of qseed's own user (the package's service \
                     uses /var/lib/qseed)"
                ),
            ),
        }
    }
    if config.targets.is_empty() {
        list.fail(
            "targets",
            "no [[target]] table: add one per HSM token to seed (see examples/qseed.toml)",
        );
    }

    for spec in &config.sources {
        if let config::SourceSpecKind::Device(device) = &spec.kind {
            if crate::source::device::DeviceSource::is_kernel_generator_path(&device.path) {
                list.warn(
                    &format!(
                        "device source {} is the kernel's own random generator, not a quantum \
                         source",
                        device.path.display()
                    ),
                    "name the QRNG's device node (or a Qrypt source) for quantum entropy: \
                     seeding an HSM from the kernel adds nothing the HSM's generator lacks",
                );
            }
        }
    }
    check_quota(&mut list, &config);
    // Modules first (issue 24): nothing is bought when no target could take the bytes.
    let modules = Modules::new();
    let usable = {
        let modules = modules.clone();
        let targets: Vec<_> = config
            .targets
            .iter()
            .map(|t| (t.kind, t.module.clone(), t.init_args.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .filter(|(kind, path, init_args)| {
                    *kind != config::TargetKind::Pkcs11
                        || modules.get(path, init_args.as_deref()).is_ok()
                })
                .count()
        })
        .await
        .unwrap_or(0)
    };
    let bytes = if usable == 0 && !config.targets.is_empty() {
        list.warn(
            "entropy source: not asked",
            "no target's module loads (see below), so nothing was bought; fix the modules \
             and run doctor again",
        );
        Vec::new()
    } else {
        check_source(&mut list, &config).await
    };
    if crate::source::simulated_accepted() {
        list.warn(
            "entropy source: the answers are SIMULATED (qseed's API simulator), not quantum \
             entropy",
            "fine for a test; for production remove source.allow_simulated and set url to \
             Qrypt's API or your appliance",
        );
    }
    let mut bytes = bytes.into_iter();
    let mut checked = std::collections::HashSet::new();
    for target in config.targets {
        let path = target.module.clone();
        let first_use = checked.insert(path.clone());
        let seed = bytes.next();
        let modules = modules.clone();
        let guard = guard.clone();
        let retry = retry_pin == Some(target.name.as_str());
        let lines = tokio::task::spawn_blocking(move || {
            check_target(target, modules, guard, seed, first_use, retry)
        })
        .await
        .unwrap_or_else(|e| vec![Line::Fail("PKCS#11 checks".into(), e.to_string())]);
        for line in lines {
            match line {
                Line::Ok(what) => list.ok(&what),
                Line::Fail(what, why) => list.fail(&what, &why),
            }
        }
    }
    let finalize = modules.clone();
    let _ =
        tokio::task::spawn_blocking(move || finalize.finalize_all(crate::service::SHUTDOWN_GRACE))
            .await;

    say!();
    if list.failures == 0 {
        say!(
            "All checks passed{}.",
            if list.warnings > 0 {
                format!(" ({} warning(s) above)", list.warnings)
            } else {
                String::new()
            }
        );
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} check(s) failed; see the fixes above",
            list.failures
        )))
    }
}

fn check_permissions(list: &mut Checklist, path: &Path, config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    let shown = path.display();
    if mode & 0o002 != 0 {
        list.fail(
            &format!("permissions of {shown} ({mode:04o})"),
            &format!("anyone can change it; run: chmod o-w {shown}"),
        );
    } else if mode & 0o004 != 0
        && (config.legacy || config.targets.iter().any(|t| t.login.is_some()))
    {
        list.warn(
            &format!("permissions of {shown} ({mode:04o}): readable by every user"),
            &format!("it names the HSM's PIN source (or holds a PIN); run: chmod o-rwx {shown}"),
        );
    } else {
        list.ok(&format!("permissions of {shown} ({mode:04o})"));
    }
}

/// The API tokens' expiry (JWTs) and each source's month against its budget.
fn check_quota(list: &mut Checklist, config: &Config) {
    let state = crate::state::StateDir::resolve(config.state_dir.as_deref());
    let now = std::time::SystemTime::now();
    for spec in &config.sources {
        let config::SourceSpecKind::Qrypt(api) = &spec.kind else {
            continue;
        };
        if let Some(expiry) = api
            .token
            .as_ref()
            .and_then(crate::source::quota::token_expiry)
        {
            let when = humantime::format_rfc3339_seconds(expiry);
            match crate::source::quota::expiry_warning(expiry, now) {
                Some(warning) => list.warn(
                    &format!("source {:?}: API token expires on {when}", spec.name),
                    &warning,
                ),
                None => list.ok(&format!(
                    "source {:?}: API token valid until {when}",
                    spec.name
                )),
            }
        }
        let count = crate::source::quota::MonthlyCount::new(
            api.url.as_str(),
            api.monthly_budget,
            state.folder(),
        );
        let month = count.figures();
        match month.budget {
            Some(budget) if month.forecast > budget => list.warn(
                &format!(
                    "source {:?}: {} bytes bought this month; at this pace {} by its end, more \
                     than monthly_budget ({budget})",
                    spec.name, month.bytes, month.forecast
                ),
                "buy a larger plan, raise monthly_budget, or lower the targets' size or raise \
                 their period (each target costs size / period)",
            ),
            Some(budget) => list.ok(&format!(
                "source {:?}: {} bytes bought this month, forecast {} of monthly_budget {budget}",
                spec.name, month.bytes, month.forecast
            )),
            None if month.bytes > 0 => list.ok(&format!(
                "source {:?}: {} bytes bought this month (forecast {}; no monthly_budget set)",
                spec.name, month.bytes, month.forecast
            )),
            None => {}
        }
    }
}

/// Whether the service could serve telemetry where configured: the address is free, or a
/// running qseed serves it already. Another program on the port is a failure: the service
/// would seed without /metrics and /readyz (it retries the bind), which monitoring must know.
async fn check_telemetry(list: &mut Checklist, config: &Config) {
    let Some(addr) = config.telemetry_listen else {
        return;
    };
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            drop(listener);
            list.ok(&format!(
                "telemetry address {addr}: free for /metrics and /readyz"
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if served_by_qseed(addr).await {
                list.ok(&format!(
                    "telemetry address {addr}: served by a running qseed"
                ));
            } else {
                list.fail(
                    &format!("telemetry address {addr}"),
                    &format!(
                        "another program listens there ({e}): the service would seed without \
                         /metrics and /readyz, trying the address again every 10s. Free the \
                         port, or set telemetry.listen to a free address or to \"off\""
                    ),
                );
            }
        }
        Err(e) => list.fail(
            &format!("telemetry address {addr}"),
            &format!(
                "cannot listen there ({e}); set telemetry.listen to an address of this machine, \
                 or to \"off\""
            ),
        ),
    }
}

/// Whether what listens on `addr` answers /metrics as qseed does (2 s, 64 KiB at most).
async fn served_by_qseed(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await.ok()?;
        Some(answer)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), ask).await {
        Ok(Some(answer)) => String::from_utf8_lossy(&answer).contains("qseed_build_info"),
        _ => false,
    }
}

/// One request for what the targets need for one seed each; the bytes are returned, one
/// buffer per target, for the seeding checks.
async fn check_source(list: &mut Checklist, config: &Config) -> Vec<EntropyBytes> {
    let client = match super::run::make_sources(config, false) {
        Ok(c) => c,
        Err(e) => {
            list.fail("entropy source", &e.to_string());
            return Vec::new();
        }
    };
    let describe = client.describe();
    if let Some(route) = client.route() {
        list.ok(&format!("route to the entropy API: {route}"));
    }
    if let Err(e) =
        crate::source::set::refuse_mixing_one_host(&config.sources, config.source_mode).await
    {
        list.fail("sources", &e);
        return Vec::new();
    }
    let pool = Arc::new(Pool::new(client, config.pool));
    // The doctor's bytes are checked against, and recorded in, the record `run` and `once`
    // share: a damaged one stops it before anything is bought, as it stops them.
    if let Some(state) = crate::state::StateDir::resolve(config.state_dir.as_deref()).folder() {
        match crate::pool::replay::SharedRecord::open(state, crate::pool::health::REPLAY_MEMORY) {
            Ok(record) => {
                list.ok(&format!(
                    "replay record: {} block(s) remembered in {}",
                    record.len(),
                    state.join("replay").display()
                ));
                pool.use_replay_record(record);
            }
            Err(why) => {
                list.fail("replay record", &why);
                return Vec::new();
            }
        }
    }
    let ids: Vec<_> = config
        .targets
        .iter()
        .map(|t| (pool.register(t.size, t.period, Some(1)), t.size))
        .collect();
    let started = std::time::Instant::now();
    let mut seeds = Vec::new();
    for (id, size) in ids {
        match pool.take(id, size).await {
            Ok(bytes) => seeds.push(bytes),
            Err(e) => {
                list.fail(&format!("entropy API {describe}"), &e.to_string());
                return Vec::new();
            }
        }
    }
    let stats = pool.stats();
    let set = pool.source();
    if stats.requests > 0 && set.members().len() == 1 {
        list.ok(&format!(
            "entropy API {describe} accepted the token: {} bytes in {} request(s), {} ms, \
             health tests passed",
            stats.bytes_downloaded,
            stats.requests,
            started.elapsed().as_millis()
        ));
    }
    for member in set.members() {
        if let crate::source::set::AnySource::Qrypt(client) = &member.source {
            if let Some(unit) = client.block_unit() {
                list.ok(&format!(
                    "source {}: POST /api/v1/entropy's block_size is read in {unit} \
                     (source.block_unit = \"{}\")",
                    member.name,
                    client.block_unit_setting().as_str()
                ));
            }
        }
    }
    if set.members().len() > 1 {
        check_each_source(list, &set, config).await;
        if let Some(in_use) = set.in_use() {
            list.ok(&format!(
                "sources in use ({}): {in_use}",
                match set.mode() {
                    crate::source::set::Mode::Failover => "failover",
                    crate::source::set::Mode::Mix { .. } => "mix",
                }
            ));
        }
    }
    seeds
}

/// Each of several sources on its own: one block (1 KiB, then wiped) through its own health
/// tests, and what an appliance says of itself.
async fn check_each_source(list: &mut Checklist, set: &SourceSet, config: &Config) {
    use crate::source::set::AnySource;
    for member in set.members() {
        let label = format!("source {} ({})", member.name, member.source.describe());
        if let AnySource::Qrypt(client) = &member.source {
            if let Some(capabilities) = client.capabilities().await {
                list.ok(&format!("{label}: /api/v1/capabilities: {capabilities}"));
            }
        }
        let started = std::time::Instant::now();
        match member.source.fetch(1).await {
            Ok(block) => {
                let mut tests = crate::pool::HealthTests::new(config.pool.health);
                let (_, failures) =
                    crate::pool::health::screen(&mut tests, block, crate::source::BLOCK_LEN);
                match failures.first() {
                    None => list.ok(&format!(
                        "{label}: 1 KiB in {} ms, health tests passed",
                        started.elapsed().as_millis()
                    )),
                    Some(f) => list.fail(
                        &label,
                        &format!("its block failed the health tests ({f}): is it broken?"),
                    ),
                }
            }
            Err(e) => list.fail(&label, &e.to_string()),
        }
    }
}

enum Line {
    Ok(String),
    Fail(String, String),
}

fn check_target(
    config: crate::config::TargetConfig,
    modules: Modules,
    guard: PinGuard,
    seed: Option<EntropyBytes>,
    first_use: bool,
    retry_pin: bool,
) -> Vec<Line> {
    let mut lines = Vec::new();
    let name = config.name.clone();
    if let crate::config::TargetKind::Kernel { credit } = config.kind {
        // The bytes bought for it are used: the kernel takes them as it will in the service.
        let result = match &seed {
            Some(bytes) => crate::kernel::inject(bytes.expose(), credit),
            None => crate::kernel::check_permission().map(|()| crate::kernel::Reseeded::Now),
        };
        lines.push(match result {
            Ok(reseeded) => Line::Ok(format!(
                "target {name}: the kernel took {} (RNDADDENTROPY, credit {credit:?}){}",
                seed.as_ref()
                    .map_or("an empty seed".to_string(), |b| format!(
                        "a {}-byte seed",
                        b.len()
                    )),
                match reseeded {
                    crate::kernel::Reseeded::Now => " and reseeded its generator (RNDRESEEDCRNG)",
                    crate::kernel::Reseeded::AtNextReseed => {
                        "; this kernel has no RNDRESEEDCRNG: used at its next scheduled reseed"
                    }
                }
            )),
            Err(e) => Line::Fail(format!("target {name}: kernel"), e.to_string()),
        });
        return lines;
    }
    let path = config.module.clone();
    let shown = path.display().to_string();
    let pkcs11 = match modules.get(&path, config.init_args.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            lines.push(Line::Fail(format!("module {shown}"), e.to_string()));
            return lines;
        }
    };
    if first_use {
        let about = pkcs11
            .get_library_info()
            .map(|i| {
                format!(
                    "{} {} (Cryptoki {})",
                    i.manufacturer_id(),
                    i.library_description(),
                    i.cryptoki_version()
                )
            })
            .unwrap_or_default();
        lines.push(Line::Ok(format!("module {shown} loads: {about}")));
    }
    let found = match token::find(&pkcs11, &shown, &config.token) {
        Ok(t) => t,
        Err(e) => {
            lines.push(Line::Fail(format!("target {name}: token"), e.to_string()));
            return lines;
        }
    };
    lines.push(Line::Ok(format!(
        "target {name}: token {:?} found (serial {}, model {}, slot {})",
        found.label,
        super::slots::printable(&found.serial),
        super::slots::printable(&found.model),
        found.slot
    )));
    if !found.has_rng {
        lines.push(Line::Fail(
            format!("target {name}: random number generator"),
            HsmError::NoRng.to_string(),
        ));
        return lines;
    }
    let logs_in = config.login.is_some();
    let mut target = Target::new(config, modules, guard);
    if retry_pin {
        match target.lift_pin_guard(&found) {
            Ok(Some(file)) => lines.push(Line::Ok(format!(
                "target {name}: PIN guard lifted ({} removed); presenting the PIN once",
                file.display()
            ))),
            Ok(None) => lines.push(Line::Ok(format!(
                "target {name}: PIN guard: no refused PIN on record; presenting the PIN once"
            ))),
            Err(e) => {
                lines.push(Line::Fail(format!("target {name}: PIN guard"), e));
                return lines;
            }
        }
    }
    match target.connect() {
        Ok(_) if logs_in => lines.push(Line::Ok(format!("target {name}: login as user"))),
        Ok(_) => lines.push(Line::Ok(format!(
            "target {name}: session open (no login configured)"
        ))),
        Err(e) => {
            lines.push(Line::Fail(
                format!("target {name}: session and login"),
                e.to_string(),
            ));
            return lines;
        }
    }
    match seed {
        Some(bytes) => match target.seed(&bytes) {
            Ok(_) => lines.push(Line::Ok(format!(
                "target {name}: the token has an RNG and accepted a {}-byte seed{}",
                bytes.len(),
                match target.max_seed() {
                    Some(max) => format!(
                        " (in {} call(s) of at most {max} bytes: {})",
                        bytes.len().div_ceil(max),
                        if target.config().max_seed.is_some() {
                            "max_seed".to_string()
                        } else {
                            "the module's known limit".to_string()
                        }
                    ),
                    None => String::new(),
                }
            ))),
            Err(e) => lines.push(Line::Fail(
                format!("target {name}: C_SeedRandom"),
                e.to_string(),
            )),
        },
        None => lines.push(Line::Fail(
            format!("target {name}: C_SeedRandom"),
            "not tried: no entropy could be had (see the entropy API check)".into(),
        )),
    }
    target.close();
    lines
}
