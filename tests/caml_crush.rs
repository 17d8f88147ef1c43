//! Caml Crush (Debian's caml-crush-server and caml-crush-clients): a PKCS#11 filtering proxy
//! whose client library talks to `pkcs11proxyd` over a Unix socket or TCP, with pkcs11-spy and
//! SoftHSM behind the server (the spy log is written in the server's process, so a seed in it
//! crossed the process boundary).
//!
//! Once its server is gone, the client answers every call with `(CK_RV)-1`, and neither
//! `C_Finalize` + `C_Initialize` nor time brings it back: only unloading the library and
//! loading it again reconnects. qseed must do that by itself and go on seeding.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const CLIENTS: &str = "/usr/lib/x86_64-linux-gnu/caml-crush";

/// Where the client reaches the server.
#[derive(Clone, Copy)]
enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    fn client(self) -> PathBuf {
        Path::new(CLIENTS).join(match self {
            Transport::Unix => "libp11clientunix.so",
            Transport::Tcp => "libp11clienttcp.so",
        })
    }
}

struct Server {
    child: Option<Child>,
    config: PathBuf,
    env: Vec<(String, PathBuf)>,
    /// What the client's PKCS11PROXY_SOCKET_PATH names.
    address: String,
    transport: Transport,
    unix_socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Server {
    /// `pkcs11proxyd` in the foreground for this world's SoftHSM, through the spy; with
    /// `forbid_seed`, its filter refuses C_SeedRandom.
    fn new(world: &World, transport: Transport, forbid_seed: bool) -> Self {
        let filter = world.path("filter.conf");
        let forbidden = if forbid_seed {
            "forbidden_functions = [(\"softhsm\", [C_SeedRandom])]\n"
        } else {
            ""
        };
        std::fs::write(
            &filter,
            format!(
                "debug = 0\nmodules = [(\"softhsm\", \"{SPY}\")]\nlog_subchannel = filter\n\
                 {forbidden}"
            ),
        )
        .unwrap();
        let unix_socket = world.path("proxy.sock");
        let (address, bind) = match transport {
            Transport::Unix => (
                unix_socket.display().to_string(),
                format!("type = \"local\"; path = \"{}\";", unix_socket.display()),
            ),
            Transport::Tcp => {
                let port = free_port();
                (
                    format!("127.0.0.1:{port}"),
                    format!("type = \"internet\"; bind = \"127.0.0.1:{port}\";"),
                )
            }
        };
        let config = world.path("pkcs11proxyd.conf");
        std::fs::write(
            &config,
            format!(
                "netplex {{\n controller {{\n  max_level = \"info\";\n  socket_directory = \
                 \"{netplex}\";\n  logging {{ type = \"stderr\"; }};\n }};\n service {{\n  name = \
                 \"PKCS#11 Filtering Proxy\";\n  conn_limit = 1;\n  protocol {{\n   name = \
                 \"rpc_pkcs11\";\n   address {{ {bind} }};\n  }};\n  processor {{\n   type = \
                 \"rpc_pkcs11\";\n   filter_config = \"{filter}\";\n   use_ssl = false;\n  }};\n  \
                 workload_manager {{\n   type = \"dynamic\";\n   max_jobs_per_thread = 1;\n   \
                 min_free_jobs_capacity = 1;\n   max_free_jobs_capacity = 1;\n   max_threads = \
                 100;\n  }};\n }}\n}}\n",
                netplex = world.path("netplex").display(),
                filter = filter.display(),
            ),
        )
        .unwrap();
        let mut server = Self {
            child: None,
            config,
            env: vec![
                ("SOFTHSM2_CONF".into(), world.path("softhsm2.conf")),
                ("PKCS11SPY".into(), PathBuf::from(SOFTHSM)),
                ("PKCS11SPY_OUTPUT".into(), world.path("spy.log")),
            ],
            address,
            transport,
            unix_socket,
        };
        server.start();
        server
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.unix_socket);
        let child = Command::new("pkcs11proxyd")
            .args(["-fg", "-conf"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pkcs11proxyd runs (apt-get install caml-crush-server caml-crush-clients)");
        self.child = Some(child);
        let ready = match self.transport {
            Transport::Unix => wait_until(Duration::from_secs(10), || self.unix_socket.exists()),
            Transport::Tcp => wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(&self.address).is_ok()
            }),
        };
        assert!(ready, "pkcs11proxyd did not start");
    }

    /// Kills the server and the workers it forked for connections.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client_env(&self) -> [(&str, &str); 2] {
        [
            ("PKCS11PROXY_SOCKET_PATH", self.address.as_str()),
            ("PKCS11PROXY_LIBNAME", "softhsm"),
        ]
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn require_caml_crush(transport: Transport) {
    assert!(
        transport.client().exists(),
        "{} is missing: apt-get install caml-crush-server caml-crush-clients (scripts/test does)",
        transport.client().display()
    );
}

fn metric(text: &str, start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(start).map(|v| v.trim().parse().unwrap()))
}

/// Seeding through Caml Crush goes on after its server is killed and started again.
fn resumes_after_the_server_restarts(transport: Transport) {
    require_caml_crush(transport);
    let world = World::new();
    world.add_token("cc");
    let mut server = Server::new(&world, transport, false);
    let client = transport.client();
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world
            .target("crush", "cc", 48, "1s", true)
            .replace(SPY, &client.display().to_string())
    ));
    let service = world.start_service_with(&server.client_env());
    let base = service.endpoint();
    assert!(
        world.wait_for_seeds(2, Duration::from_secs(10)),
        "{}",
        service.log()
    );

    server.kill();
    // Down for a few rounds: every call now fails.
    std::thread::sleep(Duration::from_secs(3));
    let before = world.spy().seeds().len();
    let restarted = std::time::Instant::now();
    server.start();
    assert!(
        wait_until(Duration::from_secs(12), || world.spy().seeds().len()
            >= before + 2),
        "seeding did not resume after the server came back:\n{}",
        service.log()
    );
    let resumed = restarted.elapsed();
    let log = service.log();
    assert!(log.contains("loading it again"), "{log}");
    assert!(log.contains("working again"), "{log}");
    let (_, metrics) = http_get(&format!("{base}/metrics"));
    let resets = metric(
        &metrics,
        &format!(
            "qseed_module_resets_total{{module=\"{}\"}} ",
            client.display()
        ),
    );
    assert!(resets.is_some_and(|n| n >= 1.0), "{metrics}");
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");

    let spy = world.spy();
    assert_seeds_are_distinct_served_bytes(&spy.seeds(), &world.sim.served());
    eprintln!("seeding resumed {resumed:?} after the Caml Crush server came back (period 1s)");
}

#[test]
fn seeding_resumes_after_the_server_restarts_unix_socket() {
    resumes_after_the_server_restarts(Transport::Unix);
}

#[test]
fn seeding_resumes_after_the_server_restarts_tcp() {
    resumes_after_the_server_restarts(Transport::Tcp);
}

/// A Caml Crush server that is not running when qseed starts makes its target a target that is
/// down, not a configuration error: the SoftHSM target beside it seeds, the service keeps
/// running, and the Caml Crush target seeds once its server is up.
#[test]
fn a_server_down_at_the_start_stops_nothing_else() {
    let transport = Transport::Unix;
    require_caml_crush(transport);
    let world = World::new();
    world.add_token("cc");
    world.add_token("good");
    let mut server = Server::new(&world, transport, false);
    server.kill();
    let client = transport.client();
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target_at("good", "good", 48, "1s", true, "0s"),
        world
            .target_at("crush", "cc", 32, "1s", true, "500ms")
            .replace(SPY, &client.display().to_string())
    ));
    let mut service = world.start_service_with(&server.client_env());
    assert!(
        service.wait_for_log("seeded good:", Duration::from_secs(10)),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(service.alive(), "{}", service.log());
    assert!(
        !service.log().contains("seeded crush:"),
        "{}",
        service.log()
    );

    server.start();
    assert!(
        service.wait_for_log("seeded crush:", Duration::from_secs(12)),
        "the Caml Crush target did not seed once its server was up:\n{}",
        service.log()
    );
    let log = service.log();
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    let spy = world.spy();
    assert_seeds_are_distinct_served_bytes(&spy.seeds(), &world.sim.served());
}

/// A filter that forbids C_SeedRandom: the target stops with the reason, and what it cost is at
/// most what its first seed needed (one purchase), not a purchase per round or a pool's worth.
#[test]
fn a_filter_that_forbids_seeding_costs_at_most_the_first_seed() {
    let transport = Transport::Unix;
    require_caml_crush(transport);
    let world = World::new();
    world.add_token("cc");
    let server = Server::new(&world, transport, true);
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world
            .target("crush", "cc", 48, "1s", true)
            .replace(SPY, &server_client(transport))
    ));
    let service = world.start_service_with(&server.client_env());
    assert!(
        service.wait_for_log("crush: target stopped", Duration::from_secs(10)),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = service.log();
    let _ = service.stop();
    assert!(log.contains("C_SeedRandom"), "{log}");
    let served = world.sim.served().len();
    eprintln!("bytes bought for a token that refuses seeds: {served}");
    assert!(
        served <= 1024,
        "{served} bytes bought for a token that refuses every seed:\n{log}"
    );
    assert_eq!(world.spy().seeds().len(), 0);
}

fn server_client(transport: Transport) -> String {
    transport.client().display().to_string()
}
