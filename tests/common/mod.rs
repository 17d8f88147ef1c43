//! The test world: a private SoftHSM token folder, OpenSC's pkcs11-spy in front of SoftHSM, the
//! API simulator on 127.0.0.1 over TLS with a throwaway CA, and the real `qseed` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use qseed::simulator::{Fault, Options, Simulator};

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";
pub const API_TOKEN: &str = "test-api-token-5f1c9e";
pub const PIN: &str = "246810";

pub struct World {
    pub dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    pub sim: Simulator,
    /// The module pkcs11-spy forwards to: SoftHSM, or the fault module in front of it.
    spied: std::cell::RefCell<PathBuf>,
}

impl World {
    pub fn new() -> Self {
        Self::with_options(Options {
            token: Some(API_TOKEN.into()),
            record: true,
            ..Options::default()
        })
    }

    pub fn with_options(options: Options) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sim = runtime.block_on(Simulator::start(options)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        qseed::commands::demo::write_softhsm_config(dir.path()).unwrap();
        std::fs::write(dir.path().join("api.token"), format!("{API_TOKEN}\n")).unwrap();
        if let Some(pem) = sim.ca_pem() {
            std::fs::write(dir.path().join("ca.pem"), pem).unwrap();
        }
        std::fs::write(dir.path().join("user.pin"), PIN).unwrap();
        for secret in ["api.token", "user.pin"] {
            private(&dir.path().join(secret));
        }
        Self {
            dir,
            runtime,
            sim,
            spied: std::cell::RefCell::new(PathBuf::from(SOFTHSM)),
        }
    }

    /// A world with one token "tok" and a configuration seeding it (`size` bytes every
    /// `period`, logging in with [`PIN`] when `login`), through `dialect`.
    pub fn one_target(dialect: &str, size: usize, period: &str, login: bool) -> Self {
        let world = Self::new();
        world.add_token("tok");
        world.write_config(&format!(
            "{}{}",
            world.source(dialect),
            world.target("tok", "tok", size, period, login)
        ));
        world
    }

    /// Tokens "good" (logging in with [`PIN`] when `good_logs_in`) and "bad" (logging in with
    /// `wrong`, from `bad.pin`, `bad_offset` later), both every `period`.
    pub fn good_and_wrong_pin(
        &self,
        wrong: &str,
        period: &str,
        good_logs_in: bool,
        bad_offset: &str,
    ) {
        self.add_token("good");
        self.add_token("bad");
        std::fs::write(self.path("bad.pin"), wrong).unwrap();
        private(&self.path("bad.pin"));
        self.write_config(&format!(
            "{}{}{}",
            self.source("entropy"),
            self.target_at("good", "good", 48, period, good_logs_in, "0s"),
            self.target_at("bad", "bad", 48, period, true, bad_offset)
                .replace("user.pin", "bad.pin"),
        ));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Initializes a SoftHSM token with the user PIN [`PIN`].
    pub fn add_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.path("softhsm2.conf"))
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", "13579135", "--pin", PIN])
            .output()
            .expect("softhsm2-util runs (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `[source]` table that points at this world's simulator, a `[telemetry]` table on a
    /// free loopback port (tests run in parallel), and a `[pool]` table without the flush at
    /// the stop (tests that count seeds count rounds; `tests/flush.rs` tests the flush).
    pub fn source(&self, dialect: &str) -> String {
        format!(
            "[telemetry]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nflush_timeout = \"0s\"\n\n\
             [source]\nurl = \"{}\"\ndialect = \"{dialect}\"\ntoken_file = \"api.token\"\n\
             ca_file = \"ca.pem\"\ntimeout = \"5s\"\nallow_simulated = true\n\n",
            self.sim.url()
        )
    }

    /// A `[[target]]` table seeding token `label` through the spy.
    pub fn target(
        &self,
        name: &str,
        label: &str,
        size: usize,
        period: &str,
        login: bool,
    ) -> String {
        self.target_at(name, label, size, period, login, "0s")
    }

    /// [`World::target`] with an `offset`. pkcs11-spy's log is unreadable where two calls
    /// overlap in time (their lines interleave), so tests with several targets give them
    /// offsets that keep their calls apart.
    pub fn target_at(
        &self,
        name: &str,
        label: &str,
        size: usize,
        period: &str,
        login: bool,
        offset: &str,
    ) -> String {
        let login = if login {
            "login = \"user\"\npin_file = \"user.pin\"\n"
        } else {
            "login = \"none\"\n"
        };
        format!(
            "[[target]]\nname = \"{name}\"\nmodule = \"{SPY}\"\ntoken_label = \"{label}\"\n\
             size = {size}\nperiod = \"{period}\"\noffset = \"{offset}\"\n{login}\n"
        )
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path("qseed.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The real binary, with this world's SoftHSM, spy log and configuration.
    pub fn qseed(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qseed"));
        cmd.env("SOFTHSM2_CONF", self.path("softhsm2.conf"))
            .env("PKCS11SPY", &*self.spied.borrow())
            .env("QSEED_FAULT_FILE", self.path("fault"))
            .env("QSEED_FAULT_REAL_MODULE", SOFTHSM)
            .env("QSEED_FAULT_THREAD_LOG", self.path("threads.log"))
            .env("PKCS11SPY_OUTPUT", self.path("spy.log"))
            .env("QSEED_CONFIG_FILE", self.path("qseed.toml"))
            // The PIN guard's records stay in this world (never in /var/lib/qseed).
            .env("STATE_DIRECTORY", self.path("state"))
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("QRYPT_TOKEN")
            .env_remove("QSEED_LOG")
            .stdin(Stdio::null());
        // The simulator is on this machine: a proxy of the machine running the tests must not
        // be in the way (tests/proxy.rs sets its own).
        for var in [
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "JOURNAL_STREAM",
        ] {
            cmd.env_remove(var).env_remove(var.to_ascii_lowercase());
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.qseed().args(args).output().unwrap()
    }

    /// Runs `qseed run` for `for_how_long`, then SIGTERM; returns its output.
    pub fn run_service(&self, for_how_long: Duration) -> Output {
        let child = self
            .qseed()
            .arg("run")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(for_how_long);
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait_with_output().unwrap()
    }

    pub fn set_fault(&self, fault: Fault) {
        self.sim.set_fault(fault);
    }

    /// Puts the fault module between pkcs11-spy and SoftHSM.
    pub fn use_fault_module(&self) {
        *self.spied.borrow_mut() = fault_module();
        self.set_hsm_fault("");
    }

    /// The names of the threads that made each successful `C_SeedRandom` through the fault
    /// module, in call order.
    pub fn seeding_threads(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("threads.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Selects the fault module's fault ("" for none); read on every call.
    pub fn set_hsm_fault(&self, fault: &str) {
        std::fs::write(self.path("fault"), fault).unwrap();
    }

    pub fn spy(&self) -> SpyLog {
        SpyLog::read(&self.path("spy.log"))
    }

    /// Waits until the spy log shows at least `n` successful seeds.
    pub fn wait_for_seeds(&self, n: usize, within: Duration) -> bool {
        wait_until(within, || self.spy().seeds().len() >= n)
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// Secret files as an operator should keep them: readable by the owner only.
pub fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// pkcs11-spy's log, cut into calls.
#[derive(Debug)]
pub struct SpyLog {
    pub calls: Vec<SpyCall>,
}

#[derive(Debug)]
pub struct SpyCall {
    pub name: String,
    pub lines: Vec<String>,
}

impl SpyLog {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut calls: Vec<SpyCall> = Vec::new();
        for line in text.lines() {
            // A call starts with "<n>: C_Name".
            if let Some((n, name)) = line.split_once(": ") {
                if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && name.starts_with("C_")
                {
                    calls.push(SpyCall {
                        name: name.trim().to_string(),
                        lines: Vec::new(),
                    });
                    continue;
                }
            }
            if let Some(call) = calls.last_mut() {
                call.lines.push(line.to_string());
            }
        }
        Self { calls }
    }

    pub fn count(&self, name: &str) -> usize {
        self.calls.iter().filter(|c| c.name == name).count()
    }

    /// The seed bytes of every successful `C_SeedRandom`, in call order.
    pub fn seeds(&self) -> Vec<Vec<u8>> {
        self.calls
            .iter()
            .filter(|c| c.name == "C_SeedRandom")
            .filter(|c| c.lines.iter().any(|l| l.starts_with("Returned:  0 CKR_OK")))
            .map(|c| c.dump("[in] pSeed[ulSeedLen]"))
            .collect()
    }

    /// How many `C_Login` calls presented `pin` (the spy dumps the PIN: test tokens only).
    pub fn logins_with(&self, pin: &str) -> usize {
        self.calls
            .iter()
            .filter(|c| c.name == "C_Login")
            .filter(|c| c.dump("[in] pPin[ulPinLen]") == pin.as_bytes())
            .count()
    }
}

impl SpyCall {
    /// The bytes of the call's hex dump whose header line starts with `header`
    /// ("[in] pSeed[ulSeedLen] 0x... / 48", then lines of "    00000010  BD CD ...  ascii").
    fn dump(&self, header: &str) -> Vec<u8> {
        let declared: usize = self
            .lines
            .iter()
            .find(|l| l.starts_with(header))
            .and_then(|l| l.rsplit('/').next())
            .map(|n| n.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no {header} line in {:?}", self.lines));
        let mut bytes = Vec::with_capacity(declared);
        for l in &self.lines {
            // Hex in columns 14..62.
            if l.len() > 14 && l.starts_with("    ") && l.as_bytes()[12] == b' ' {
                let hex = &l[14..l.len().min(62)];
                for tok in hex.split_whitespace() {
                    bytes.push(u8::from_str_radix(tok, 16).expect("hex byte"));
                }
            }
        }
        assert_eq!(bytes.len(), declared, "the spy's dump is complete");
        bytes
    }
}

/// Where each seed sits in the served stream, as (offset, length), sorted by offset. Panics
/// for a seed that is not a run of served bytes.
fn place_seeds(seeds: &[Vec<u8>], served: &[u8]) -> Vec<(usize, usize)> {
    let mut placed: Vec<(usize, usize)> = seeds
        .iter()
        .map(|seed| {
            let at = served
                .windows(seed.len())
                .position(|w| w == &seed[..])
                .unwrap_or_else(|| panic!("a {}-byte seed is not from a good answer", seed.len()));
            (at, seed.len())
        })
        .collect();
    placed.sort();
    placed
}

/// Checks that the seeds are exactly the simulator's bytes, each byte used once: sorted by
/// where they sit in the served stream, they tile a prefix of it with no gap and no overlap.
/// Returns the number of bytes the seeds cover.
pub fn assert_seeds_tile_served(seeds: &[Vec<u8>], served: &[u8]) -> usize {
    let mut end = 0;
    for (at, len) in place_seeds(seeds, served) {
        assert_eq!(at, end, "seeds overlap or leave a gap at served byte {end}");
        end = at + len;
    }
    end
}

pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// A running `qseed run`, its log in a file that tests can read while it runs.
pub struct Service {
    child: std::process::Child,
    log: PathBuf,
}

impl World {
    pub fn start_service(&self) -> Service {
        self.start_service_with(&[])
    }

    /// [`World::start_service`] with extra environment variables.
    pub fn start_service_with(&self, env: &[(&str, &str)]) -> Service {
        let log = self.path("service.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .qseed()
            .envs(env.iter().copied())
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Service { child, log }
    }
}

impl Service {
    /// The telemetry endpoint's base URL, from the service's log.
    pub fn endpoint(&self) -> String {
        assert!(self.wait_for_log("telemetry on http://", Duration::from_secs(5)));
        let log = self.log();
        let start = log.find("telemetry on http://").unwrap() + "telemetry on ".len();
        let url = &log[start..];
        url[..url.find("/metrics").unwrap()].to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(text))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The exit status of a service that ends on its own.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGTERM, then the exit status and how long the exit took.
    pub fn stop(mut self) -> (std::process::ExitStatus, Duration) {
        let start = std::time::Instant::now();
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        (status, start.elapsed())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every seed is bytes the simulator served in a good answer, and no two seeds share a byte
/// (gaps are allowed: bytes of failed calls are wiped, not used).
pub fn assert_seeds_are_distinct_served_bytes(seeds: &[Vec<u8>], served: &[u8]) {
    for pair in place_seeds(seeds, served).windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "two seeds share bytes");
    }
}

/// The test-only PKCS#11 fault module (tests/fault-module), built on first use.
pub fn fault_module() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "qseed-fault-module"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building tests/fault-module failed");
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            let path = target.join("debug/libqseed_fault_module.so");
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
}

impl SpyLog {
    /// The seed bytes of every `C_SeedRandom` that failed.
    pub fn failed_seed_calls(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| c.name == "C_SeedRandom")
            .filter(|c| {
                c.lines
                    .iter()
                    .any(|l| l.starts_with("Returned:") && !l.contains("CKR_OK"))
            })
            .count()
    }
}

/// A plain blocking HTTP GET (the telemetry endpoint is loopback HTTP): status and body.
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
