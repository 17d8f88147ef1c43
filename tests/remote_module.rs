//! A PKCS#11 module in another process that dies and comes back: p11-kit's client in qseed,
//! p11-kit's server with pkcs11-spy and SoftHSM behind it (so the spy log is written in the
//! server's process: the bytes crossed the process boundary). Killing the server's
//! `p11-kit-remote` child makes every call fail (`CKR_DEVICE_ERROR`) until the client module is
//! finalized and initialized again; qseed must do that by itself and go on seeding.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `p11-kit server` for token `label` of this world's SoftHSM, through the spy.
fn server(world: &World, label: &str) -> (Server, String) {
    let socket = world.path("p11-kit.sock");
    let child = Command::new("p11-kit")
        .args(["server", "--foreground", "--name"])
        .arg(&socket)
        .args(["--provider", SPY, &format!("pkcs11:token={label}")])
        .env("SOFTHSM2_CONF", world.path("softhsm2.conf"))
        .env("PKCS11SPY", SOFTHSM)
        .env("PKCS11SPY_OUTPUT", world.path("spy.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("p11-kit runs (apt-get install p11-kit p11-kit-modules)");
    assert!(wait_until(Duration::from_secs(5), || socket.exists()));
    (Server(child), format!("unix:path={}", socket.display()))
}

/// The server's per-connection `p11-kit-remote` children.
fn remote_children(server: &Server) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-P", &server.0.id().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn metric(text: &str, start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(start).map(|v| v.trim().parse().unwrap()))
}

/// A world with token "rt" behind the p11-kit server, and `qseed run` seeding it through
/// p11-kit's client as target "remote" (48 B every 1 s; `more` is appended to the
/// configuration after that target), once it has seeded twice.
fn start_remote(world: &World, more: &str) -> (Server, Service) {
    if !std::path::Path::new(CLIENT).exists() {
        panic!("{CLIENT} is missing: apt-get install p11-kit-modules (scripts/test does)");
    }
    world.add_token("rt");
    let (server, address) = server(world, "rt");
    world.write_config(&format!(
        "{}{}{more}",
        world.source("entropy"),
        world
            .target("remote", "rt", 48, "1s", true)
            .replace(SPY, CLIENT)
    ));
    let service = world.start_service_with(&[("P11_KIT_SERVER_ADDRESS", &address)]);
    assert!(
        world.wait_for_seeds(2, Duration::from_secs(6)),
        "{}",
        service.log()
    );
    (server, service)
}

#[test]
fn seeding_resumes_after_the_module_process_dies() {
    let world = World::new();
    let (server, service) = start_remote(&world, "");
    let base = service.endpoint();

    // The module's process dies.
    let children = remote_children(&server);
    assert!(!children.is_empty(), "p11-kit-remote is running");
    let killed = std::time::Instant::now();
    signal_all("-KILL", &children);
    let before = world.spy().seeds().len();
    assert!(
        wait_until(Duration::from_secs(8), || world.spy().seeds().len()
            >= before + 2),
        "{}",
        service.log()
    );
    let resumed = killed.elapsed();
    let log = service.log();
    assert!(
        log.contains("the device or its connection is lost") && log.contains("working again"),
        "{log}"
    );
    let (_, metrics) = http_get(&format!("{base}/metrics"));
    let resets = metric(
        &metrics,
        &format!("qseed_module_resets_total{{module=\"{CLIENT}\"}} "),
    );
    assert!(resets.is_some_and(|n| n >= 1.0), "{metrics}");
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");

    // Every seed crossed to the server's process, each one served bytes, none twice; a new
    // session logged in again after the re-initialization.
    let spy = world.spy();
    assert_seeds_are_distinct_served_bytes(&spy.seeds(), &world.sim.served());
    assert_eq!(spy.logins_with(PIN), 2, "one login before, one after");
    eprintln!("seeding resumed {resumed:?} after the module's process was killed (period 1s)");
}

/// Processes stopped with SIGSTOP, continued by [`Stopped::resume`] or, should the test fail
/// first, killed (a stopped process would outlive the test).
struct Stopped(Vec<String>);

impl Stopped {
    fn new(pids: Vec<String>) -> Self {
        signal_all("-STOP", &pids);
        Self(pids)
    }

    fn resume(mut self) {
        signal_all("-CONT", &std::mem::take(&mut self.0));
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal_all("-KILL", &self.0);
    }
}

fn signal_all(signal: &str, pids: &[String]) {
    for pid in pids {
        let _ = Command::new("kill").args([signal, pid]).status();
    }
}

/// Issue 24, a hang in a real module process, not the fault module: the server's child is
/// stopped (SIGSTOP) so the client's `C_SeedRandom` waits on its socket. The target is declared
/// hung after its timeout while a SoftHSM target beside it goes on seeding; when the child is
/// continued the call returns `CKR_OK`, and that late seed is audited and counted like any.
#[test]
fn a_call_hung_in_the_module_process_is_audited_when_it_returns() {
    let world = World::new();
    world.add_token("healthy");
    let (server, service) = start_remote(
        &world,
        &format!(
            "timeout = \"1s\"\n\n[[target]]\nname = \"healthy\"\nmodule = \"{SOFTHSM}\"\n\
             token_label = \"healthy\"\nperiod = \"1s\"\noffset = \"500ms\"\n"
        ),
    );

    let children = remote_children(&server);
    assert!(!children.is_empty(), "p11-kit-remote is running");
    let stopped = Stopped::new(children);
    assert!(
        service.wait_for_log(
            "C_SeedRandom has not returned after 1s",
            Duration::from_secs(5)
        ),
        "{}",
        service.log()
    );
    let healthy_before = service.log().matches("seeded healthy:").count();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        service.log().matches("seeded healthy:").count() >= healthy_before + 2,
        "the other target seeds while the call hangs: {}",
        service.log()
    );

    stopped.resume();
    assert!(
        service.wait_for_log(
            "the C_SeedRandom given up on returned after",
            Duration::from_secs(5)
        ),
        "{}",
        service.log()
    );
    let before = world.spy().seeds().len();
    assert!(
        wait_until(Duration::from_secs(5), || world.spy().seeds().len()
            >= before + 2),
        "seeding resumes: {}",
        service.log()
    );
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(world.path("service.log")).unwrap_or_default();
    assert!(status.success(), "{log}");
    assert!(log.contains("and succeeded"), "{log}");

    // The spy runs in the server's process: every seed there has its audit record here, the
    // late one included, and none was counted as wiped.
    let spy = world.spy();
    assert_eq!(
        log.matches("seeded remote:").count(),
        spy.seeds().len(),
        "one audit record per seed that reached the token: {log}"
    );
    assert!(
        log.contains(" 0 handed out but not injected (wiped)"),
        "{log}"
    );
    assert_seeds_are_distinct_served_bytes(&spy.seeds(), &world.sim.served());
}
