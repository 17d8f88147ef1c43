//! A seed that leaves qseed's process and reaches a device: tpm2-pkcs11 on a software TPM
//! (swtpm). Each `C_SeedRandom` becomes one `TPM2_StirRandom` command, read off swtpm's socket
//! with strace and compared with the simulator's bytes; the module's 128-byte limit splits a
//! large seed; killing and restarting the TPM under `qseed run` heals by itself.
//!
//! Needs swtpm, tpm2-pkcs11, tpm2-abrmd, dbus and strace (scripts/test installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TPM2_PKCS11: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";
const TPM2_STIR_RANDOM: u32 = 0x146;

/// A software TPM on loopback with one tpm2-pkcs11 token "tpmtok".
struct Tpm {
    dir: PathBuf,
    port: u16,
}

impl Tpm {
    fn new(dir: &Path) -> Self {
        let port = free_port_pair();
        let tpm = Tpm {
            dir: dir.to_path_buf(),
            port,
        };
        std::fs::create_dir_all(tpm.dir.join("state")).unwrap();
        std::fs::create_dir_all(tpm.dir.join("store")).unwrap();
        tpm.start();
        // Making a token needs a resource manager (on a private bus), during set-up only.
        let script = format!(
            "set -e; cd {d}; dbus-daemon --session --fork --print-address=3 --print-pid=4 \
             3>bus.addr 4>bus.pid; export DBUS_SESSION_BUS_ADDRESS=$(cat bus.addr); \
             tpm2-abrmd --session --allow-root --tcti=swtpm:host=127.0.0.1,port={p} & abrmd=$!; \
             trap 'kill $abrmd; kill $(cat bus.pid)' EXIT; sleep 1; \
             export TPM2TOOLS_TCTI=tabrmd:bus_type=session; \
             tpm2_ptool init --path={d}/store >/dev/null; \
             tpm2_ptool addtoken --path={d}/store --pid=1 --label=tpmtok --userpin={pin} \
             --sopin=12345678 >/dev/null",
            d = tpm.dir.display(),
            p = tpm.port,
            pin = PIN
        );
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "making the TPM token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tpm
    }

    fn start(&self) {
        let status = Command::new("swtpm")
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                self.port + 1
            ))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.dir.join("state").display()))
            .args(["--flags", "not-need-init,startup-clear", "--pid"])
            .arg(format!("file={}", self.pid_file().display()))
            .arg("--daemon")
            .status()
            .expect("swtpm runs (apt-get install swtpm swtpm-tools)");
        assert!(status.success());
        assert!(wait_until(Duration::from_secs(5), || self.pid().is_some()));
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("swtpm.pid")
    }

    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
    }

    fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = std::fs::remove_file(self.pid_file());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The environment tpm2-pkcs11 reads.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "TPM2_PKCS11_TCTI",
                format!("swtpm:host=127.0.0.1,port={}", self.port),
            ),
            (
                "TPM2_PKCS11_STORE",
                self.dir.join("store").display().to_string(),
            ),
            ("TSS2_LOG", "all+NONE".into()),
            ("PKCS11SPY", TPM2_PKCS11.into()),
        ]
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The data of every `TPM2_StirRandom` command in strace's `-xx` log of swtpm's reads.
fn stir_random_commands(strace_log: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(strace_log).unwrap_or_default();
    let mut stream = Vec::new();
    for line in text.lines() {
        let Some(start) = line
            .find("read(")
            .and_then(|i| line[i..].find('"').map(|j| i + j + 1))
        else {
            continue;
        };
        let Some(end) = line[start..].find('"').map(|j| start + j) else {
            continue;
        };
        for hex in line[start..end].split("\\x").filter(|h| !h.is_empty()) {
            stream.push(u8::from_str_radix(&hex[..2], 16).unwrap());
        }
    }
    // TPM commands: tag u16, size u32, code u32, then (StirRandom, no sessions) u16 + data.
    let mut commands = Vec::new();
    let mut i = 0;
    while i + 10 <= stream.len() {
        let tag = u16::from_be_bytes([stream[i], stream[i + 1]]);
        let size = u32::from_be_bytes(stream[i + 2..i + 6].try_into().unwrap()) as usize;
        let code = u32::from_be_bytes(stream[i + 6..i + 10].try_into().unwrap());
        if !(tag == 0x8001 || tag == 0x8002) || size < 10 || i + size > stream.len() {
            i += 1;
            continue;
        }
        if code == TPM2_STIR_RANDOM && tag == 0x8001 && size >= 12 {
            let len = u16::from_be_bytes([stream[i + 10], stream[i + 11]]) as usize;
            commands.push(stream[i + 12..i + 12 + len].to_vec());
        }
        i += size;
    }
    commands
}

fn tpm_world(size: usize, period: &str) -> (World, Tpm) {
    assert!(
        Path::new(TPM2_PKCS11).exists(),
        "{TPM2_PKCS11} is missing: apt-get install libtpm2-pkcs11-1 (scripts/test does)"
    );
    let world = World::new();
    let tpm = Tpm::new(&world.path("tpm"));
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("tpm", "tpmtok", size, period, false)
    ));
    (world, tpm)
}

#[test]
fn a_seed_reaches_the_tpm_in_calls_of_at_most_128_bytes() {
    let (world, tpm) = tpm_world(1000, "10s");
    let pid = tpm.pid().unwrap();
    let trace = world.path("swtpm.strace");
    let mut strace: Child = Command::new("strace")
        .args(["-p", &pid, "-e", "trace=read", "-xx", "-s", "65536", "-o"])
        .arg(&trace)
        .stderr(Stdio::null())
        .spawn()
        .expect("strace runs (apt-get install strace)");
    std::thread::sleep(Duration::from_millis(500));
    let out = world.qseed().envs(tpm.env()).arg("once").output().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    assert!(out.status.success(), "{}", stderr(&out));

    let served = world.sim.served();
    let seeds = world.spy().seeds();
    let lengths: Vec<usize> = seeds.iter().map(Vec::len).collect();
    assert_eq!(
        lengths,
        [128, 128, 128, 128, 128, 128, 128, 104],
        "tpm2-pkcs11's limit"
    );
    assert_eq!(seeds.concat(), served[..1000].to_vec());
    // What the TPM read off its socket: the same bytes, in TPM2_StirRandom commands.
    let at_tpm = stir_random_commands(&trace);
    assert_eq!(
        at_tpm.concat(),
        served[..1000].to_vec(),
        "{} commands",
        at_tpm.len()
    );
}

#[test]
fn seeding_resumes_after_the_tpm_restarts() {
    let (world, tpm) = tpm_world(48, "1s");
    let service = world.start_service_with(
        &tpm.env()
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert!(
        world.wait_for_seeds(2, Duration::from_secs(8)),
        "{}",
        service.log()
    );
    tpm.kill();
    std::thread::sleep(Duration::from_secs(2));
    let before = world.spy().seeds().len();
    tpm.start();
    let restarted = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || world.spy().seeds().len()
            >= before + 2),
        "{}",
        service.log()
    );
    let resumed = restarted.elapsed();
    let log = service.log();
    assert!(log.contains("working again"), "{log}");
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    assert_seeds_are_distinct_served_bytes(&world.spy().seeds(), &world.sim.served());
    eprintln!("two seeds {resumed:?} after the TPM came back (period 1s)");
}
