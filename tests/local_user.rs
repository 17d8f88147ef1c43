//! Issue 21: qseed against an unprivileged local user on the same host. Run as root (as CI
//! runs), with a user the test makes (`qseed-intruder`) who owns files, folders and FIFOs
//! where root's qseed looks, and acts through `setpriv`. One test per numbered item of the
//! issue; each names its item.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const INTRUDER: &str = "qseed-intruder";
const WRONG: &str = "999999";

/// Whether the test can run: root is needed to make a user and act as her. In CI a missing
/// root is a failure, never a skip.
fn root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tests/local_user.rs needs root (CI runs as root)"
    );
    eprintln!("skipped: needs root to make a user and act as her");
    false
}

/// The intruder's uid and gid; the user is made on first use.
fn intruder() -> (u32, u32) {
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, INTRUDER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                INTRUDER,
            ])
            .status()
            .expect("useradd runs");
        // 9: made meanwhile by another test binary.
        assert!(
            status.success() || status.code() == Some(9),
            "useradd failed"
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// `program ARGS` as the intruder.
fn as_intruder(program: &str, args: &[&str]) -> Output {
    intruder();
    Command::new("setpriv")
        .args([
            &format!("--reuid={INTRUDER}"),
            &format!("--regid={INTRUDER}"),
            "--clear-groups",
            "--",
            program,
        ])
        .args(args)
        .output()
        .expect("setpriv runs (util-linux)")
}

fn give_to_intruder(path: &Path) {
    let (uid, gid) = intruder();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A folder of the world that the intruder owns and may fill (the world itself is root's,
/// 0711: she may pass through it, not change it).
fn her_folder(world: &World) -> PathBuf {
    chmod(world.dir.path(), 0o711);
    let hers = world.path("hers");
    std::fs::create_dir_all(&hers).unwrap();
    give_to_intruder(&hers);
    chmod(&hers, 0o755);
    hers
}

fn once(world: &World) -> Output {
    world.run(&["once"])
}

/// `once` with the configuration at `config`.
fn once_with(world: &World, config: &Path) -> Output {
    world
        .qseed()
        .env("QSEED_CONFIG_FILE", config)
        .arg("once")
        .output()
        .unwrap()
}

/// A world with token "tok" logging in with `pin` (from user.pin), every 10 s.
fn login_world(pin: &str) -> World {
    let world = World::one_target("entropy", 48, "10s", true);
    std::fs::write(world.path("user.pin"), pin).unwrap();
    world
}

#[test]
fn item_01_modules_and_files_other_users_control_are_refused() {
    if !root() {
        return;
    }
    let world = login_world(PIN);
    let hers = her_folder(&world);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    // The same configuration with root's own files seeds: what follows fails for its files.
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A module she copied into her folder: hers to swap.
    let out = as_intruder(
        "cp",
        &[SOFTHSM, &hers.join("libhsm.so").display().to_string()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    world.write_config(&config.replace(SPY, &hers.join("libhsm.so").display().to_string()));
    let out = once(&world);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!("belongs to {INTRUDER}")) && text.contains("chown root"),
        "{text}"
    );
    assert!(!text.contains("seeded"), "{text}");

    // Root's module in a folder anyone may write.
    let open = world.path("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    std::fs::copy(SOFTHSM, open.join("libhsm.so")).unwrap();
    world.write_config(&config.replace(SPY, &open.join("libhsm.so").display().to_string()));
    let text = stderr(&once(&world));
    assert!(
        text.contains(&format!("{} on the way", open.display()))
            && text.contains("mode 0777")
            && text.contains(&format!("chmod o-w {}", open.display())),
        "{text}"
    );

    // Root's configuration file in her folder.
    world.write_config(&config);
    let in_hers = hers.join("qseed.toml");
    std::fs::copy(world.path("qseed.toml"), &in_hers).unwrap();
    chmod(&in_hers, 0o644);
    let out = once_with(&world, &in_hers);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "{} on the way belongs to {INTRUDER}",
            hers.display()
        )),
        "{text}"
    );

    // Her API token, PIN and CA files.
    for (file, key) in [
        ("api.token", "token_file"),
        ("user.pin", "pin_file"),
        ("ca.pem", "ca_file"),
    ] {
        give_to_intruder(&world.path(file));
        let out = once(&world);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file}: {text}");
        assert!(
            text.contains(key) && text.contains(&format!("belongs to {INTRUDER}")),
            "{file}: {text}"
        );
        std::os::unix::fs::chown(world.path(file), Some(0), Some(0)).unwrap();
    }
    assert_eq!(once(&world).status.code(), Some(0));
}

#[test]
fn item_02_what_is_done_to_the_pin_file_or_the_configuration_path_is_not_a_new_pin() {
    if !root() {
        return;
    }
    let world = login_world(WRONG);
    let out = once(&world);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(world.spy().logins_with(WRONG), 1);
    let pin = world.path("user.pin");
    let sub = world.path("sub");
    std::fs::create_dir(&sub).unwrap();
    type Change<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let changes: Vec<Change> = vec![
        ("chmod", Box::new(|| chmod(&pin, 0o400))),
        (
            "chown",
            Box::new(|| std::os::unix::fs::chown(&pin, Some(0), Some(0)).unwrap()),
        ),
        (
            "touch",
            Box::new(|| {
                let text = std::fs::read(&pin).unwrap();
                std::fs::write(&pin, text).unwrap();
            }),
        ),
        (
            "ln",
            Box::new(|| {
                let moved = world.path("user.pin.real");
                std::fs::rename(&pin, &moved).unwrap();
                std::os::unix::fs::symlink(&moved, &pin).unwrap();
            }),
        ),
    ];
    for (what, change) in changes {
        change();
        let out = once(&world);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{what}: {text}");
        assert!(text.contains("not logging in"), "{what}: {text}");
        assert_eq!(world.spy().logins_with(WRONG), 1, "after {what}");
    }
    // Another spelling of the configuration's path, and a link to it.
    let spelled = sub.join("../qseed.toml");
    let linked = world.path("link.toml");
    std::os::unix::fs::symlink(world.path("qseed.toml"), &linked).unwrap();
    for config in [&spelled, &linked] {
        let out = once_with(&world, config);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert_eq!(world.spy().logins_with(WRONG), 1, "{}", config.display());
    }

    // An inline PIN: the configuration file's metadata (a package upgrade's chown and chmod)
    // is not a new PIN either.
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("pin_file = \"user.pin\"", &format!("pin = \"{WRONG}\"")));
    chmod(&world.path("qseed.toml"), 0o600);
    for round in 0..3 {
        let out = once(&world);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        std::os::unix::fs::chown(world.path("qseed.toml"), Some(0), Some(0)).unwrap();
        chmod(&world.path("qseed.toml"), 0o640 - round * 0o40);
    }
    assert_eq!(world.spy().logins_with(WRONG), 1);

    // A corrected PIN is presented, once.
    world.write_config(&config);
    std::fs::remove_file(&pin).unwrap();
    std::fs::write(&pin, PIN).unwrap();
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(world.spy().logins_with(PIN), 1);
}

/// A tmpfs of a few KiB mounted on `path` (unmounted when dropped).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
            .arg(path)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs failed");
        Self(path.to_path_buf())
    }

    /// Fills it to the last byte.
    fn fill(&self) {
        let mut file = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = [0u8; 512];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn item_03_no_login_unless_the_attempt_is_recorded() {
    if !root() {
        return;
    }
    // The state folder is hers.
    let world = login_world(WRONG);
    let state = world.path("state");
    std::fs::create_dir(&state).unwrap();
    give_to_intruder(&state);
    for _ in 0..3 {
        let out = once(&world);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{text}");
        assert!(text.contains("not logging in"), "{text}");
    }
    assert_eq!(world.spy().count("C_Login"), 0);

    // The record replaced by a FIFO, the lock by a folder, then by a link: refused, at once.
    let world = login_world(WRONG);
    assert_eq!(once(&world).status.code(), Some(4));
    assert_eq!(world.spy().logins_with(WRONG), 1);
    let guard = world.path("state/pin-guard");
    let record = std::fs::read_dir(&guard)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "record"))
        .unwrap();
    let lock = record.with_extension("lock");
    std::fs::remove_file(&record).unwrap();
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &record,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = once(&world);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "once waited on the FIFO"
    );
    let text = stderr(&out);
    assert!(
        text.contains("FIFO") && text.contains("not logging in"),
        "{text}"
    );
    std::fs::remove_file(&record).unwrap();
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    let text = stderr(&once(&world));
    assert!(text.contains("not logging in"), "{text}");
    std::fs::remove_dir(&lock).unwrap();
    let planted = world.path("planted");
    std::os::unix::fs::symlink(&planted, &lock).unwrap();
    let text = stderr(&once(&world));
    assert!(text.contains("symbolic link"), "{text}");
    assert!(!planted.exists(), "the link was followed");
    assert_eq!(world.spy().logins_with(WRONG), 1);

    // A full disk: the attempt cannot be written, so there is no login.
    let world = login_world(PIN);
    let disk = SmallDisk::mount(&world.path("state"));
    assert_eq!(
        once(&world).status.code(),
        Some(0),
        "the guard's key is written"
    );
    disk.fill();
    std::fs::write(world.path("user.pin"), WRONG).unwrap();
    for _ in 0..3 {
        let out = once(&world);
        let text = stderr(&out);
        assert!(
            text.contains("cannot record") || text.contains("No space"),
            "{text}"
        );
    }
    assert_eq!(world.spy().logins_with(WRONG), 0);
}

/// Qrypt's qseed YAML file for the world's token, naming `module`.
fn legacy_yaml(world: &World, module: &str) -> PathBuf {
    let yaml = world.path("qseed_config.yml");
    std::fs::write(
        &yaml,
        format!(
            "qrypt_token: {API_TOKEN}\nsize: 48\nperiod: 1\ncryptoki_lib: {module}\n\
             cryptoki_slot_id: 0\ncryptoki_user_pin: {PIN}\n"
        ),
    )
    .unwrap();
    chmod(&yaml, 0o600);
    yaml
}

/// Whether `qseed migrate YAML` opened `module`, as strace saw it.
fn migrate_opens(world: &World, yaml: &Path, module: &str) -> (Output, bool) {
    let trace = world.path("migrate.strace");
    let out = Command::new("strace")
        .args(["-f", "-e", "trace=openat,open", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_qseed"))
        .arg("migrate")
        .arg(yaml)
        .env("SOFTHSM2_CONF", world.path("softhsm2.conf"))
        .output()
        .expect("strace runs (scripts/test installs it)");
    let opened = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .any(|l| l.contains(module) && !l.contains("ENOENT"));
    (out, opened)
}

#[test]
fn item_04_migrate_trusts_nothing_another_user_controls() {
    if !root() {
        return;
    }
    let world = World::new();
    world.add_token("tok");
    // Root's own file: the module is loaded to name the token in the slot.
    let yaml = legacy_yaml(&world, SOFTHSM);
    let (out, opened) = migrate_opens(&world, &yaml, "libsofthsm2.so");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(opened, "root's own file: the module is loaded");
    // Her file: printed, and the module it names is never opened.
    give_to_intruder(&yaml);
    let (out, opened) = migrate_opens(&world, &yaml, "libsofthsm2.so");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!opened, "a module named by her file was loaded");
    assert!(stderr(&out).contains("is not loaded"), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[target]]"));

    // --write into her folder: refused, nothing written.
    std::os::unix::fs::chown(&yaml, Some(0), Some(0)).unwrap();
    let hers = her_folder(&world);
    let out = world.run(&[
        "migrate",
        &yaml.display().to_string(),
        "--write",
        &hers.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--write folder") && stderr(&out).contains(INTRUDER),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_dir(&hers).unwrap().count(), 0);

    // Input is bounded: /dev/zero is refused, not read.
    let mut child = world
        .qseed()
        .args(["migrate", "/dev/zero"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done = wait_until(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !done {
        let _ = child.kill();
    }
    assert!(done, "migrate /dev/zero kept reading");
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("not a regular file"), "{text}");
}

/// A configuration with one device source at `path` and token "tok".
fn device_config(world: &World, path: &Path) {
    world.write_config(&format!(
        "[telemetry]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nflush_timeout = \"0s\"\n\n\
         [[source]]\nname = \"qrng\"\nkind = \"device\"\npath = \"{}\"\ntimeout = \"2s\"\n\n{}",
        path.display(),
        world.target("tok", "tok", 48, "10s", false)
    ));
}

#[test]
fn item_05_a_device_source_others_could_write_is_refused_and_urandom_is_named() {
    if !root() {
        return;
    }
    let world = World::new();
    world.add_token("tok");
    let hers = her_folder(&world);
    // Her FIFO: she would choose every seed.
    let fifo = hers.join("qrng");
    let out = as_intruder("mkfifo", &["-m", "0600", &fifo.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    device_config(&world, &fifo);
    let text = stderr(&once(&world));
    assert!(text.contains(&format!("belongs to {INTRUDER}")), "{text}");
    // Root's FIFO that anyone may write.
    let open_fifo = world.path("qrng");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &open_fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    chmod(&open_fifo, 0o622);
    device_config(&world, &open_fifo);
    let out = once(&world);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("0622"), "{}", stderr(&out));
    assert!(world.spy().seeds().is_empty());
    // The kernel's generator: it seeds, and says it is not quantum.
    device_config(&world, Path::new("/dev/urandom"));
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the kernel's own random generator, not a quantum source"),
        "{}",
        stderr(&out)
    );
    let out = world.run(&["doctor"]);
    assert!(
        stderr(&out).contains("not a quantum source")
            || String::from_utf8_lossy(&out.stdout).contains("not a quantum source"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn item_06_a_device_file_is_never_read_twice_and_no_link_is_followed() {
    if !root() {
        return;
    }
    let world = World::new();
    world.add_token("tok");
    let file = world.path("entropy.bin");
    let bytes: Vec<u8> = (0..4 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    device_config(&world, &file);
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Copied back in place (a new inode, the same bytes): read on from where it was.
    let copy = world.path("copy.bin");
    std::fs::copy(&file, &copy).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::fs::rename(&copy, &file).unwrap();
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[0], bytes[..48]);
    assert_eq!(
        seeds[1],
        bytes[1024..1024 + 48],
        "the second block, not the first again"
    );

    // A link where the position lock goes: not followed, nothing made where it points.
    let lock = world.path("state/sources/qrng.lock");
    std::fs::remove_file(&lock).unwrap();
    let planted = world.path("planted");
    std::os::unix::fs::symlink(&planted, &lock).unwrap();
    let out = once(&world);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(!planted.exists(), "the link was followed");
    assert_eq!(world.spy().seeds().len(), 2);
}

#[test]
fn item_07_the_replay_record_is_shared_and_never_silently_reset() {
    if !root() {
        return;
    }
    // A stray byte, then a lost key: an error with the reset, never a fresh record.
    let world = World::one_target("entropy", 48, "10s", false);
    assert_eq!(once(&world).status.code(), Some(0));
    let seen = world.path("state/replay/seen");
    let mut record = std::fs::OpenOptions::new()
        .append(true)
        .open(&seen)
        .unwrap();
    record.write_all(&[0]).unwrap();
    let out = once(&world);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let reset = format!("rm -r {}", world.path("state/replay").display());
    assert!(stderr(&out).contains(&reset), "{}", stderr(&out));
    let out = world.run(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[FAIL] replay record") && text.contains(&reset),
        "{text}"
    );
    let len = std::fs::metadata(&seen).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seen)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    std::fs::remove_file(world.path("state/replay/key")).unwrap();
    let out = once(&world);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 1);

    // A running `run` refuses a block a `once` accepted after `run` started.
    let world = World::new();
    world.add_token("a");
    world.add_token("b");
    world.write_config(&format!(
        "{}{}",
        world
            .source("entropy")
            .replace("[pool]\n", "[pool]\nhorizon = \"1s\"\n"),
        world.target_at("a", "a", 48, "6s", false, "5s")
    ));
    let once_config = world.path("once.toml");
    std::fs::write(
        &once_config,
        format!(
            "{}{}",
            world.source("entropy"),
            world.target("b", "b", 48, "1h", false)
        ),
    )
    .unwrap();
    // `run` starts first; the server tells it to come back in 10 s.
    world.set_fault(qseed::simulator::Fault::RateLimited { retry_after: 10 });
    let service = world.start_service();
    assert!(
        service.wait_for_log("rate limiting", Duration::from_secs(15)),
        "{}",
        service.log()
    );
    world.set_fault(qseed::simulator::Fault::None);
    let out = once_with(&world, &once_config);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let once_seed = world.spy().seeds();
    assert_eq!(once_seed.len(), 1, "{}", service.log());
    // The server's only good answer so far went to `once`: it is the one replayed below.
    assert_eq!(world.sim.served().len(), 1024, "{}", service.log());
    // From now on the server answers every request with the first bytes it ever served.
    world.set_fault(qseed::simulator::Fault::ReplayServed);
    assert!(
        service.wait_for_log("identical to one received earlier", Duration::from_secs(30)),
        "{}",
        service.log()
    );
    drop(service);
    let seeds = world.spy().seeds();
    assert!(
        seeds.iter().filter(|s| **s == once_seed[0]).count() == 1,
        "a block went into two tokens: {seeds:?}"
    );
}

#[test]
fn item_08_mix_refuses_two_sources_on_one_host() {
    if !root() {
        return;
    }
    let world = World::one_target("entropy", 48, "10s", false);
    let port = world.sim.addr().port();
    let source = |name: &str, host: &str| {
        format!(
            "[[source]]\nname = \"{name}\"\nurl = \"https://{host}:{port}\"\n\
             dialect = \"entropy\"\ntoken_file = \"api.token\"\nca_file = \"ca.pem\"\nallow_simulated = true\n\n"
        )
    };
    for (a, b) in [("localhost", "localhost"), ("localhost", "127.0.0.1")] {
        world.write_config(&format!(
            "[telemetry]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nsources = \"mix\"\n\n{}{}{}",
            source("a", a),
            source("b", b),
            world.target("tok", "tok", 48, "10s", false)
        ));
        let out = once(&world);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{a} + {b}: {text}");
        assert!(text.contains("reach one host"), "{text}");
        assert_eq!(world.sim.requests(), 0, "nothing bought");
    }
}

#[test]
fn item_09_a_uri_loads_no_relative_module_and_never_shows_the_pin() {
    if !root() {
        return;
    }
    let world = World::new();
    world.add_token("tok");
    for (token, expected) in [
        (
            "pkcs11:token=tok?module-path=libsofthsm2.so",
            "module-path must be an absolute path",
        ),
        ("pkcs11:token=tok&pin-value=8642975", "holds \"pin-value\""),
        ("pkcs11:token=tok?pin-value:8642975", "has no '='"),
        ("pkcs11:token=tok;8642975", "has no '='"),
    ] {
        world.write_config(&format!(
            "{}[[target]]\nname = \"t\"\nmodule = \"{SPY}\"\ntoken = \"{token}\"\n",
            world.source("entropy")
        ));
        let out = once(&world);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{token}: {text}");
        assert!(text.contains(expected), "{token}: {text}");
        assert!(!text.contains("8642975"), "{token}: {text}");
    }
}

#[test]
fn item_10_one_token_through_p11_kit_and_directly_is_one_token() {
    if !root() {
        return;
    }
    const PROXY: &str = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so";
    assert!(Path::new(PROXY).exists(), "apt-get install p11-kit");
    let world = login_world(WRONG);
    let out = once(&world);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(world.spy().logins_with(WRONG), 1);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(SPY, PROXY));
    let out = once(&world);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.contains("not logging in"), "{text}");
    let records = std::fs::read_dir(world.path("state/pin-guard"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "record")
        })
        .count();
    assert_eq!(records, 1);
}

#[test]
fn item_11_a_pin_file_gives_its_first_line_and_no_nul() {
    if !root() {
        return;
    }
    let world = login_world(&format!("{PIN}\nsecond line\n"));
    let out = once(&world);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(world.spy().logins_with(PIN), 1);
    std::fs::write(world.path("user.pin"), format!("{PIN}\0junk")).unwrap();
    let out = once(&world);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("NUL") && !text.contains("junk"), "{text}");
    assert_eq!(world.spy().count("C_Login"), 1);
}

/// GET `path` of `addr` within `limit`: the status, or `None`.
fn scrape(addr: &str, path: &str, limit: Duration) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, limit).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    stream.set_write_timeout(Some(limit)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[test]
fn item_12_connections_held_open_without_a_request_do_not_black_out_metrics() {
    if !root() {
        return;
    }
    let world = World::one_target("entropy", 48, "2s", false);
    let service = world.start_service();
    let addr = service.endpoint().trim_start_matches("http://").to_string();
    // Her connections, opened by her and left without a request.
    intruder();
    let mut holder = Command::new("setpriv")
        .args([
            &format!("--reuid={INTRUDER}"),
            &format!("--regid={INTRUDER}"),
            "--clear-groups",
            "--",
            "bash",
            "-c",
            // bash's /dev/tcp: 200 connections on descriptors 3..=202, then nothing sent.
            "host=${1%:*}; port=${1##*:}; n=0\n\
             for fd in $(seq 3 202); do\n\
               eval \"exec $fd<>/dev/tcp/$host/$port\" && n=$((n+1))\n\
             done\n\
             echo $n; exec sleep 60\n",
            "holder",
            &addr,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut opened = String::new();
    let mut out = holder.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        opened.push(byte[0] as char);
    }
    assert_eq!(opened.trim(), "200", "her connections");
    let answered = (0..20)
        .filter(|_| scrape(&addr, "/metrics", Duration::from_secs(5)) == Some(200))
        .count();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(answered, 20, "{}", service.log());
}

#[test]
fn item_12_a_reload_into_a_hung_module_neither_freezes_metrics_nor_blocks_sigterm() {
    if !root() {
        return;
    }
    let world = World::one_target("entropy", 48, "2s", false);
    let service = world.start_service();
    let addr = service.endpoint().trim_start_matches("http://").to_string();
    assert_eq!(scrape(&addr, "/metrics", Duration::from_secs(5)), Some(200));
    // A reload into a module whose C_Initialize never returns.
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.set_hsm_fault("init-hang");
    world.add_token("other");
    world.write_config(&format!(
        "{config}[[target]]\nname = \"other\"\nmodule = \"{}\"\ntoken_label = \"other\"\n\
         login = \"none\"\n",
        fault_module().display()
    ));
    service.signal("HUP");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        scrape(&addr, "/metrics", Duration::from_secs(5)),
        Some(200),
        "{}",
        service.log()
    );
    assert!(
        service.log().contains("SIGHUP: reading"),
        "{}",
        service.log()
    );
    let (status, took) = service.stop();
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    assert!(status.code().is_some(), "exited by itself, not killed");
    world.set_hsm_fault("");
}
