//! Error paths of the real binary: each names the problem and the fix, and nothing from a bad
//! answer or a refused login reaches the HSM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use qseed::simulator::Fault;

fn world_with_one_target() -> World {
    World::one_target("quantum-entropy", 48, "1s", false)
}

#[test]
fn a_rejected_api_token_is_reported_as_a_token_problem() {
    let world = world_with_one_target();
    std::fs::write(world.path("api.token"), "wrong-token\n").unwrap();
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        log.contains("rejected the access token (HTTP 401)"),
        "{log}"
    );
    assert!(log.contains("Create a new token"), "{log}");
    assert!(
        !log.contains("wrong-token"),
        "the token is never printed: {log}"
    );
    assert_eq!(world.spy().seeds().len(), 0);
}

#[test]
fn malformed_answers_are_refused_whole() {
    let world = world_with_one_target();
    for (fault, want) in [
        (Fault::BadJson, "not valid JSON"),
        (Fault::MissingField, "has no `random` field"),
        (
            Fault::ShortBlock,
            "block 0 decoded to 1000 bytes where 1024 were asked for",
        ),
        (
            Fault::BadBase64,
            "block 0 of the answer is not valid base64",
        ),
        (Fault::Status(500), "answered HTTP 500"),
        (Fault::Status(403), "quota"),
    ] {
        world.set_fault(fault);
        let out = world.run(&["once"]);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{fault:?}: {log}");
        assert!(log.contains(want), "{fault:?}: {log}");
        assert_eq!(world.spy().seeds().len(), 0, "{fault:?}: nothing injected");
    }
    // The same target works once the server behaves.
    world.set_fault(Fault::None);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1);
    assert_eq!(&seeds[0][..], &world.sim.served()[..48]);
}

#[test]
fn an_unreachable_api_is_named() {
    let world = world_with_one_target();
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    world.write_config(&format!(
        "[source]\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = \"api.token\"\nca_file = \"ca.pem\"\n\n{}",
        world.target("tok", "tok", 48, "1s", false)
    ));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        log.contains(&format!(
            "could not reach the entropy API at https://127.0.0.1:{port}/"
        )),
        "{log}"
    );
    assert_eq!(world.spy().seeds().len(), 0);
}

#[test]
fn an_untrusted_server_certificate_is_refused() {
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("ca_file = \"ca.pem\"\n", ""));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        log.contains(
            "reached localhost, but its certificate is not trusted: invalid peer \
             certificate: UnknownIssuer; set source.ca_file"
        ) && !log.contains("could not reach"),
        "{log}"
    );
    assert_eq!(world.sim.blocks_served(), 0);
}

#[test]
fn a_missing_module_file_is_a_configuration_error() {
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(SPY, "/nonexistent/libvendor.so"));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains(
            "cannot load PKCS#11 module /nonexistent/libvendor.so: the file does not exist"
        ),
        "{log}"
    );
    assert_eq!(
        world.sim.requests(),
        0,
        "no entropy bought for a broken config"
    );
}

#[test]
fn an_unknown_token_label_lists_the_tokens_present() {
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("token_label = \"tok\"", "token_label = \"nope\""));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{log}");
    assert!(log.contains("no token with token_label \"nope\""), "{log}");
    assert!(log.contains("tokens present: \"tok\" (serial \""), "{log}");
    // SoftHSM's free slot (issue 22, item 16): named for what it is, not as `"" (serial , ...)`.
    assert!(
        log.contains("an uninitialized token (slot ") && !log.contains("(serial , slot"),
        "{log}"
    );
    assert_eq!(
        world.sim.requests(),
        0,
        "no entropy bought for a token that is not there"
    );
}

#[test]
fn a_wrong_pin_is_tried_once_and_never_again() {
    let world = World::new();
    world.add_token("locked-out");
    world.add_token("fine");
    std::fs::write(world.path("user.pin"), "999999").unwrap();
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("locked-out", "locked-out", 48, "1s", true),
        world.target_at("fine", "fine", 48, "1s", false, "500ms"),
    ));
    let out = world.run_service(Duration::from_millis(3500));
    let log = stderr(&out);
    assert!(
        log.contains("locked-out: target stopped: C_Login: CKR_PIN_INCORRECT"),
        "{log}"
    );
    assert!(
        log.contains("will not present this PIN to this token again"),
        "{log}"
    );
    assert!(!log.contains("999999"), "the PIN is never printed: {log}");
    let spy = world.spy();
    assert_eq!(
        spy.count("C_Login"),
        1,
        "exactly one login attempt in 3.5 s at a 1 s period"
    );
    // The other target carried on.
    assert!(log.matches("seeded fine:").count() >= 3, "{log}");
    assert!(
        out.status.success(),
        "the service ran on for the healthy target: {log}"
    );
}

#[test]
fn invalid_configurations_exit_2_with_the_key_and_the_fix() {
    let world = world_with_one_target();
    let good = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    for (broken, want) in [
        (
            good.replace("size = 48", "size = 0"),
            "size = 0 is out of range: allowed 1..=65536",
        ),
        (
            good.replace("period = \"1s\"", "period = \"400d\""),
            "period = 400d is out of range: allowed 1s to 365d",
        ),
        (
            good.replace("size = 48", "sise = 48"),
            "unknown field `sise`",
        ),
        (
            good.replace("dialect = \"quantum-entropy\"", "dialect = \"post\""),
            "unknown variant `post`",
        ),
        (good.replace("https://", "http://"), "plain HTTP"),
        (
            good.replace(
                "token_label = \"tok\"",
                "token_label = \"tok\"\nslot_id = 1",
            ),
            "keep one",
        ),
        (
            good.replace(
                "token_file = \"api.token\"",
                "token_file = \"missing.token\"",
            ),
            "missing.token\" cannot be read",
        ),
        ("[[target]\n".to_string(), "line 1"),
    ] {
        world.write_config(&broken);
        let out = world.run(&["once"]);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{broken}\n{log}");
        assert!(log.contains(want), "{want}\n{log}");
        assert!(log.contains("qseed.toml"), "names the file: {log}");
    }
    assert_eq!(world.sim.requests(), 0);

    let out = world
        .qseed()
        .args(["--config", "/nonexistent/q.toml", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the file does not exist"));
}

#[test]
fn secrets_stay_out_of_debug_logs() {
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(
        "login = \"none\"",
        "login = \"user\"\npin_file = \"user.pin\"",
    ));
    let out = world
        .qseed()
        .args(["--verbose", "once"])
        .env("QSEED_LOG", "trace")
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(API_TOKEN), "API token in the log");
    assert!(!log.contains(PIN), "PIN in the log");
    let seed = &world.spy().seeds()[0];
    let hex: String = seed[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert!(!log.to_lowercase().contains(&hex), "seed bytes in the log");
}

#[test]
fn blocks_failing_the_health_tests_are_never_injected() {
    let world = world_with_one_target();
    world.set_fault(Fault::AllZeroBlock);
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains("health tests refused all 1 block(s)"), "{log}");
    assert!(log.contains("repetition count test"), "{log}");
    assert_eq!(world.spy().seeds().len(), 0);

    // The most tolerant settings allowed still refuse it (review: min_entropy = 1 with
    // false_alarm = 1e-320 let it through); beyond them the configuration refuses.
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(
        "[pool]\n",
        "[pool]\nmin_entropy = 0.51\nfalse_alarm = 5.43e-20\n",
    ));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains("health tests refused all 1 block(s)"), "{log}");
    world.write_config(&config.replace(
        "[pool]\n",
        "[pool]\nmin_entropy = 1.0\nfalse_alarm = 1e-320\n",
    ));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 0);

    // A replayed block inside an answer: dropped, the rest used.
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("size = 48", "size = 1500"));
    world.set_fault(Fault::ReplayedBlock);
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("identical to one received earlier"), "{log}");
    let seeds = world.spy().seeds();
    let served = world.sim.served();
    assert_eq!(seeds.len(), 1);
    // Answer 1: blocks A and A again (the replay is refused); answer 2, for the 476 bytes
    // still missing: block C. `served` records the good blocks only: A, C.
    assert_eq!(world.sim.requests(), 2);
    assert_eq!(served.len(), 2 * 1024);
    assert_eq!(&seeds[0][..], &served[..1500]);
}

#[test]
fn one_shot_commands_promise_no_retry() {
    // `once` and `doctor` end after their try: no "next period" or "next try" in what they say.
    let world = World::new();
    world.add_token("a");
    world.add_token("b");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("a", "a", 48, "10s", false),
        world.target("b", "b", 48, "10s", false),
    ));
    world.set_fault(Fault::Status(500));
    let promises = ["next period", "next try", "trying again", "tries again"];
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("HTTP 500"), "{text}");
    for promise in promises {
        assert!(!text.contains(promise), "{promise:?} in {text}");
    }
    let out = world.run(&["doctor"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    for promise in promises {
        assert!(!text.contains(promise), "{promise:?} in {text}");
    }
}

/// A plain-HTTP server of the test's own that answers every request with `status_line` and
/// a body that never ends; returns its address and the bytes it managed to write.
fn endless_body_server(
    status_line: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = written.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 {status_line}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; 64 * 1024];
            // Bounded too: at most 256 MiB per connection, then the test has its answer.
            for _ in 0..4096 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
                count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    });
    (format!("http://{addr}"), written)
}

#[test]
fn an_endless_error_body_is_not_read() {
    let (url, written) = endless_body_server("500 Internal Server Error");
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "[telemetry]\nlisten = \"off\"\n[source]\nurl = \"{url}\"\nallow_http = true\n\
         auth = \"none\"\ntimeout = \"20s\"\n\n{}",
        world.target("tok", "tok", 48, "10s", false)
    ));
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("HTTP 500: xxxx"), "an excerpt: {text}");
    // qseed stopped reading after its excerpt; the kernel's socket buffers take a few MiB more.
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < 64 << 20,
        "{sent} bytes were sent before qseed hung up"
    );
}

#[test]
fn a_2xx_answer_other_than_200_shows_no_body() {
    let (url, _) = endless_body_server("206 Partial Content");
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "[telemetry]\nlisten = \"off\"\n[source]\nurl = \"{url}\"\nallow_http = true\n\
         auth = \"none\"\n\n{}",
        world.target("tok", "tok", 48, "10s", false)
    ));
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("HTTP 206") && !text.contains("xxx"), "{text}");
}

#[test]
fn one_token_named_twice_is_seeded_by_one_target() {
    let world = World::new();
    world.add_token("tok");
    let out = world.run(&["slots", "--module", SOFTHSM]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let serial = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("tok"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    // By label and by serial: found to be one token when the second target connects.
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target_at("by-label", "tok", 48, "10s", false, "0s"),
        world
            .target_at("by-serial", "tok", 48, "10s", false, "300ms")
            .replace("token_label = \"tok\"", &format!("serial = \"{serial}\"")),
    ));
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("by-serial: target stopped: token \"tok\"")
            && text.contains("is already seeded by target \"by-label\""),
        "{text}"
    );
    assert_eq!(world.spy().seeds().len(), 1, "seeded once");

    // Through two paths to one module file: refused with the configuration.
    let link = world.path("softhsm-link.so");
    std::os::unix::fs::symlink(SOFTHSM, &link).unwrap();
    world.write_config(&format!(
        "{}[[target]]\nname = \"a\"\nmodule = \"{SOFTHSM}\"\ntoken_label = \"tok\"\n\n\
         [[target]]\nname = \"b\"\nmodule = \"{}\"\ntoken_label = \"tok\"\n",
        world.source("entropy"),
        link.display()
    ));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("names the same token"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn operator_mistakes_are_refused_before_they_cost_a_login() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::one_target("entropy", 48, "10s", true);
    let good = std::fs::read_to_string(world.path("qseed.toml")).unwrap();

    // An empty label would match an uninitialized token.
    world.write_config(&good.replace("token_label = \"tok\"", "token_label = \"\""));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("token_label is empty"),
        "{}",
        stderr(&out)
    );

    // A PIN with a stray blank, or an empty inline one: refused, never presented.
    world.write_config(&good);
    std::fs::write(world.path("user.pin"), format!("{PIN} \n")).unwrap();
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("begins or ends with a space"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(PIN));
    world.write_config(&good.replace("pin_file = \"user.pin\"", "pin = \"\""));
    let out = world.run(&["once"]);
    assert!(
        stderr(&out).contains("pin (inline) is empty"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        world.spy().count("C_Login"),
        0,
        "no login was spent on them"
    );

    // Blanks around the API token in its file are trimmed, as in QRYPT_TOKEN.
    std::fs::write(world.path("user.pin"), PIN).unwrap();
    std::fs::write(world.path("api.token"), format!("  {API_TOKEN}  \n")).unwrap();
    world.write_config(&good);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Files every user may change: the configuration, a PIN file, the module.
    for (file, key) in [
        (world.path("qseed.toml"), "the configuration file"),
        (world.path("user.pin"), "pin_file"),
    ] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = world.run(&["once"]);
        assert_eq!(out.status.code(), Some(2), "{key}");
        assert!(
            stderr(&out).contains(&format!("{key} {}", file.display()))
                && stderr(&out).contains("can be changed by every user"),
            "{}",
            stderr(&out)
        );
        // The documented opt-out, from the environment.
        let out = world
            .qseed()
            .env("QSEED_ALLOW_WRITABLE_FILES", "1")
            .arg("once")
            .output()
            .unwrap();
        assert!(out.status.success(), "{key}: {}", stderr(&out));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let module = world.path("module.so");
    std::fs::copy(SPY, &module).unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o777)).unwrap();
    world.write_config(&good.replace(SPY, &module.display().to_string()));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("module") && stderr(&out).contains("chmod o-w"));
}

#[test]
fn files_that_are_devices_fifos_or_huge_are_refused_without_reading_them() {
    let world = World::one_target("entropy", 48, "10s", true);
    let good = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    let fifo = world.path("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A 1 GiB token file (sparse: nothing is written) would have become a 1 GiB header.
    let huge = std::fs::File::create(world.path("huge.token")).unwrap();
    huge.set_len(1 << 30).unwrap();
    private(&world.path("huge.token"));
    let fifo_shown = fifo.display().to_string();
    for (config, want) in [
        (
            good.replace("ca_file = \"ca.pem\"", "ca_file = \"/dev/zero\""),
            "it is a character device, not a regular file",
        ),
        (
            good.replace(
                "ca_file = \"ca.pem\"",
                &format!("ca_file = \"{fifo_shown}\""),
            ),
            "it is a FIFO (named pipe), not a regular file",
        ),
        (
            good.replace("api.token", "huge.token"),
            "it is larger than 64 KiB",
        ),
        (
            good.replace("user.pin", "/dev/zero"),
            "it is a character device",
        ),
        (
            good.replace(SPY, &fifo_shown),
            "it is a FIFO (named pipe), not a regular file",
        ),
    ] {
        world.write_config(&config);
        let started = std::time::Instant::now();
        let out = world.run(&["once"]);
        let log = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{log}");
        assert!(log.contains(want), "{want}: {log}");
        // Refused at a glance, not after reading gigabytes or waiting for a writer.
        assert!(started.elapsed() < Duration::from_secs(20), "{want}");
    }
    // The configuration file itself.
    let out = world
        .qseed()
        .args(["--config", &fifo_shown, "once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("FIFO"), "{}", stderr(&out));
    assert_eq!(world.spy().count("C_Login"), 0);
}

#[test]
fn simulated_answers_are_refused_unless_allowed() {
    let world = world_with_one_target();
    let good = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&good.replace("allow_simulated = true\n", ""));
    for command in ["once", "doctor"] {
        let out = world.run(&[command]);
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert_ne!(out.status.code(), Some(0), "{command}: {log}");
        assert!(
            log.contains("marked its answer as simulated (x-qseed-simulator: not-real-entropy)")
                && log.contains("source.allow_simulated = true"),
            "{command}: {log}"
        );
    }
    assert_eq!(
        world.spy().seeds().len(),
        0,
        "nothing simulated was injected"
    );
    world.write_config(&good);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 1);
}

/// Review: two `qseed once` runs (the cron case) injected the same 48 bytes when the server
/// replayed them. The replay record now outlives the process, in the state folder.
#[test]
fn a_block_replayed_to_the_next_process_is_refused() {
    let world = world_with_one_target();
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    world.set_fault(Fault::ReplayServed);
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains("identical to one received earlier"), "{log}");
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1, "the replayed bytes were not injected again");
    // Only keyed hashes are kept: 16 bytes per accepted block, nothing of the block.
    let record = std::fs::read(world.path("state/replay/seen")).unwrap();
    assert_eq!(record.len(), 16);
    let served = world.sim.served();
    assert!(!record.windows(8).any(|w| served.windows(8).any(|s| s == w)));
    // A fresh block is still welcome.
    world.set_fault(Fault::None);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 2);
}

/// Review: a target whose token cannot be found still drove purchases (1 MiB bought in 20 s
/// while 96 bytes were used). Now only targets that reach their token count.
#[test]
fn a_target_whose_token_is_missing_buys_nothing() {
    let world = World::one_target("entropy", 48, "1s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&format!(
        "{config}\n{}",
        // Half a period apart: pkcs11-spy's log is unreadable where calls overlap.
        world.target_at("lost", "no-such-token", 4096, "1s", false, "500ms")
    ));
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(4, Duration::from_secs(10)),
        "{}",
        service.log()
    );
    let log = service.log();
    assert!(log.contains("lost: round failed"), "{log}");
    // Sized for "tok" alone: one block for its first round, then, once its token accepted
    // that seed, 48 B/s over the 10-minute horizon: 29 blocks.
    assert_eq!(world.sim.requests(), 2, "{log}");
    assert_eq!(world.sim.served().len(), 30 * 1024);
    let _ = service.stop();
}

/// Issue 22, item 14: a `url` with the endpoint's path pasted in is named as such before any
/// request, and a 404 names the URL requested and what `url` is.
#[test]
fn a_pasted_endpoint_or_a_wrong_path_is_named() {
    let world = world_with_one_target();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    let base = world.sim.url();
    world.write_config(&config.replace(
        &format!("url = \"{base}\""),
        &format!("url = \"{base}/api/v1/quantum-entropy\""),
    ));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        log.contains("names an endpoint (/api/v1/quantum-entropy)")
            && log.contains(&format!("write \"{base}\"")),
        "{log}"
    );
    assert_eq!(world.sim.requests(), 0);

    // A path prefix the server does not have: its 404, with the URL asked for.
    world.write_config(&config.replace(
        &format!("url = \"{base}\""),
        &format!("url = \"{base}/qrypt\""),
    ));
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        log.contains("HTTP 404")
            && log.contains(&format!(
                "no such endpoint at {base}/qrypt/api/v1/quantum-entropy?size="
            ))
            && log.contains("source.url is the API's base URL"),
        "{log}"
    );
}
