//! Proxies: the real binary reaches the simulator through a small CONNECT proxy of the test's
//! own on 127.0.0.1, from `HTTPS_PROXY` or `[source] proxy`; `NO_PROXY` and `proxy = "none"`
//! go direct; a proxy that is down is named in the error; a bad variable is refused; a
//! password in a proxy URL is sent to the proxy and never logged.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use common::*;

/// Each tunnel: its target (`host:port`) and its `Proxy-Authorization` header.
type Tunnels = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An HTTP CONNECT proxy: records each tunnel's target and `Proxy-Authorization` header.
struct ConnectProxy {
    port: u16,
    seen: Tunnels,
}

impl ConnectProxy {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let log = log.clone();
                std::thread::spawn(move || tunnel(client, &log));
            }
        });
        Self { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn tunnels(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

fn tunnel(client: TcpStream, log: &Tunnels) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut auth = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("proxy-authorization") {
                auth = Some(value.trim().to_string());
            }
        }
    }
    let mut parts = request.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        let _ = (&client).write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
        return;
    };
    log.lock().unwrap().push((target.to_string(), auth));
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = (&client).write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    (&client)
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .unwrap();
    let (mut up_read, mut up_write) = (upstream.try_clone().unwrap(), upstream);
    let mut client_write = client;
    let copy = std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut up_write);
        let _ = up_write.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_read, &mut client_write);
    let _ = client_write.shutdown(std::net::Shutdown::Write);
    let _ = copy.join();
}

/// `qseed ARGS` in `world` with extra environment variables.
fn run_with(world: &World, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    world
        .qseed()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sim_host_port(world: &World) -> String {
    world
        .sim
        .url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

#[test]
fn https_proxy_is_used_and_shown() {
    let world = World::one_target("entropy", 48, "10s", true);
    let proxy = ConnectProxy::start();
    let out = run_with(&world, &[("HTTPS_PROXY", &proxy.url())], &["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tunnels = proxy.tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].0, sim_host_port(&world));
    assert_eq!(world.spy().seeds().len(), 1, "seeded through the proxy");
    assert!(
        stderr(&out).contains(&format!("via proxy {} (HTTPS_PROXY)", proxy.url())),
        "{}",
        stderr(&out)
    );
    let doctor = run_with(&world, &[("HTTPS_PROXY", &proxy.url())], &["doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        report.contains(&format!(
            "route to the entropy API: via proxy {} (HTTPS_PROXY)",
            proxy.url()
        )),
        "{report}"
    );
}

#[test]
fn the_configured_proxy_wins_over_the_environment_and_none_goes_direct() {
    let world = World::one_target("entropy", 48, "10s", true);
    let proxy = ConnectProxy::start();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(
        "[source]\n",
        &format!("[source]\nproxy = \"{}\"\n", proxy.url()),
    ));
    let out = run_with(&world, &[("HTTPS_PROXY", &dead)], &["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(proxy.tunnels().len(), 1);
    assert!(stderr(&out).contains("(source.proxy)"), "{}", stderr(&out));

    world.write_config(&config.replace("[source]\n", "[source]\nproxy = \"none\"\n"));
    let out = run_with(&world, &[("HTTPS_PROXY", &dead)], &["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(proxy.tunnels().len(), 1, "no new tunnel");

    world.write_config(&config);
    let out = run_with(
        &world,
        &[
            ("HTTPS_PROXY", &dead),
            ("NO_PROXY", "example.com, .localhost"),
        ],
        &["-v", "once"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("entropy API route: direct (NO_PROXY names the host)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_proxy_that_is_down_is_named_in_the_error() {
    let world = World::one_target("entropy", 48, "10s", true);
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let out = run_with(&world, &[("https_proxy", &dead)], &["once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could not reach the entropy API at https://localhost:")
            && stderr(&out).contains(&format!(" via proxy {dead} (https_proxy): ")),
        "{}",
        stderr(&out)
    );
    assert_eq!(world.sim.requests(), 0);
    // The error about a proxy that is down never shows its password.
    let with_password = dead.replace("http://", "http://user:hunter2@");
    let out = run_with(&world, &[("https_proxy", &with_password)], &["once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("via proxy http://user:***@127.0.0.1:"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
}

#[test]
fn a_bad_proxy_variable_is_refused_and_a_proxy_password_never_logged() {
    let world = World::one_target("entropy", 48, "10s", true);
    let out = run_with(
        &world,
        &[("HTTPS_PROXY", "http://user:hunter2@[not-a-host")],
        &["once"],
    );
    assert_eq!(out.status.code(), Some(2));
    let said = stderr(&out);
    assert!(
        said.contains("HTTPS_PROXY = ") && said.contains("is not a proxy URL"),
        "{said}"
    );
    assert!(!said.contains("hunter2"), "{said}");
    assert_eq!(world.sim.requests(), 0, "nothing was attempted");

    let proxy = ConnectProxy::start();
    let with_password = format!("http://user:hunter2@127.0.0.1:{}", proxy.port);
    let out = run_with(&world, &[("HTTPS_PROXY", &with_password)], &["-v", "once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("user:***@127.0.0.1"),
        "{}",
        stderr(&out)
    );
    // Basic base64("user:hunter2")
    assert_eq!(
        proxy.tunnels()[0].1.as_deref(),
        Some("Basic dXNlcjpodW50ZXIy"),
        "the proxy got the credentials"
    );
}
