//! Several entropy sources, through the real binary: failover between two simulators (the
//! first stopped, then restarted), mixing (every seed the XOR of bytes both served), device
//! sources (a file and a FIFO of the test's own), and the configurations that are refused.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use qseed::simulator::{Options, Simulator};

/// A plain-HTTP simulator without a token (an appliance), recording what it serves.
fn appliance(world: &World, listen: SocketAddr) -> Simulator {
    world
        .block_on(Simulator::start(Options {
            listen,
            token: None,
            tls: false,
            record: true,
        }))
        .unwrap()
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A free port on a second loopback address: `mix` refuses two sources on one host.
fn any_port_elsewhere() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], 0))
}

fn source_table(name: &str, sim: &Simulator) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\nurl = \"{}\"\nauth = \"none\"\nallow_http = true\n\
         allow_simulated = true\ntimeout = \"2s\"\n\n",
        sim.url()
    )
}

/// The configuration: `pool` keys, the sources, one target "tok".
fn configure(world: &World, pool: &str, sources: &str, size: usize) {
    world.write_config(&format!(
        "[telemetry]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nflush_timeout = \"0s\"\n{pool}\n\
         {sources}{}",
        world.target("tok", "tok", size, "1s", false)
    ));
}

/// A world with token "tok" seeded with 48 bytes a second from appliances "a" and "b".
fn two_appliances(pool: &str) -> (World, Simulator, Simulator) {
    let world = World::new();
    world.add_token("tok");
    let a = appliance(&world, any_port());
    let b = appliance(&world, any_port_elsewhere());
    configure(
        &world,
        pool,
        &format!("{}{}", source_table("a", &a), source_table("b", &b)),
        48,
    );
    (world, a, b)
}

/// Where each seed lies in one of `streams` (stream index, offset); panics if a seed is in
/// none, and if two seeds share bytes of a stream.
fn place(seeds: &[Vec<u8>], streams: &[&[u8]]) -> Vec<(usize, usize)> {
    let mut placed: Vec<(usize, usize, usize)> = Vec::new();
    for seed in seeds {
        let at = streams
            .iter()
            .enumerate()
            .find_map(|(s, stream)| {
                stream
                    .windows(seed.len())
                    .position(|w| w == seed.as_slice())
                    .map(|at| (s, at))
            })
            .expect("every seed is bytes a source served");
        placed.push((at.0, at.1, seed.len()));
    }
    for (i, a) in placed.iter().enumerate() {
        for b in &placed[i + 1..] {
            assert!(
                a.0 != b.0 || a.1 + a.2 <= b.1 || b.1 + b.2 <= a.1,
                "two seeds share bytes"
            );
        }
    }
    placed.iter().map(|&(s, at, _)| (s, at)).collect()
}

#[test]
fn failover_switches_to_the_second_source_and_back_to_the_first() {
    let world = World::new();
    world.add_token("tok");
    let primary = appliance(&world, any_port());
    let backup = appliance(&world, any_port());
    let primary_addr = primary.addr();
    configure(
        &world,
        "horizon = \"1s\"\n",
        &format!(
            "{}{}",
            source_table("primary", &primary),
            source_table("backup", &backup)
        ),
        1024,
    );
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(2, Duration::from_secs(10)),
        "{}",
        service.log()
    );
    assert_eq!(backup.requests(), 0, "the preferred source serves");

    primary.stop();
    drop(primary);
    assert!(
        wait_until(Duration::from_secs(3), || backup.requests() > 0),
        "the second source is asked within a period: {}",
        service.log()
    );
    assert!(service.wait_for_log("entropy source: switched to backup", Duration::from_secs(2)));

    let restarted = appliance(&world, primary_addr);
    assert!(
        wait_until(Duration::from_secs(30), || restarted.requests() > 0),
        "the preferred source is tried again: {}",
        service.log()
    );
    assert!(
        service.wait_for_log(
            "entropy source: back to primary (preferred)",
            Duration::from_secs(5)
        ),
        "{}",
        service.log()
    );
    // It was found by the background probe, whose block is not lost.
    assert!(service
        .log()
        .contains("entropy source primary answers again"));
    // The backup's bytes are used once the primary's already bought ones are.
    let backup_served = backup.served();
    assert!(
        wait_until(Duration::from_secs(45), || {
            world
                .spy()
                .seeds()
                .iter()
                .any(|s| backup_served.windows(s.len()).any(|w| w == s.as_slice()))
        }),
        "a seed of the backup's bytes: {}",
        service.log()
    );
    let log_file = world.path("service.log");
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(log_file).unwrap();
    assert!(status.success(), "{log}");
    // No round was skipped while the sources changed, and every seed is bytes one of the
    // three servers served (the first primary's are recorded by the backup's and restarted
    // primary's absence: checked below), each byte used once.
    assert!(
        log.contains(" 0 rounds skipped for want of entropy"),
        "{log}"
    );
    let seeds = world.spy().seeds();
    let (backup_served, restarted_served) = (backup.served(), restarted.served());
    let later: Vec<&Vec<u8>> = seeds
        .iter()
        .filter(|s| {
            backup_served.windows(s.len()).any(|w| w == s.as_slice())
                || restarted_served.windows(s.len()).any(|w| w == s.as_slice())
        })
        .collect();
    let placed = place(
        &later.into_iter().cloned().collect::<Vec<_>>(),
        &[&backup_served, &restarted_served],
    );
    assert!(
        placed.iter().any(|(stream, _)| *stream == 0),
        "seeds from the backup"
    );
    // The audit records name the source of each request.
    assert!(log.contains("@primary"), "{log}");
    assert!(log.contains("@backup"), "{log}");
}

/// The flush at a stop hands out bytes as a round does, so its audit records must say which
/// source they came from too: with the preferred source down, every record names the backup.
#[test]
fn the_flushs_audit_records_name_the_source_its_bytes_came_from() {
    let world = World::new();
    world.add_token("tok");
    let primary = appliance(&world, any_port());
    let backup = appliance(&world, any_port());
    configure(
        &world,
        "",
        &format!(
            "{}{}",
            source_table("primary", &primary),
            source_table("backup", &backup)
        ),
        48,
    );
    primary.stop();
    drop(primary);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("flush_timeout = \"0s\"", "flush_timeout = \"2s\""));

    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("976 flushed into the targets at the stop"),
        "{log}"
    );
    let ledger = std::fs::read_to_string(world.path("state/audit/ledger.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = ledger
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["injection", "flush"], "{ledger}");
    for record in &records {
        let requests = record["request_ids"].as_str().unwrap();
        assert!(
            requests.starts_with('r') && requests.ends_with("@backup"),
            "{requests}: {ledger}"
        );
    }
    assert!(log.contains("flushed into tok: 976 bytes"), "{log}");
    assert_eq!(
        assert_seeds_tile_served(&world.spy().seeds(), &backup.served()),
        1024
    );
}

#[test]
fn mixing_seeds_the_xor_of_both_sources_each_byte_used_once() {
    let (world, a, b) = two_appliances("sources = \"mix\"\n");
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(3, Duration::from_secs(10)),
        "{}",
        service.log()
    );
    // Per-source metrics: both in use, each asked once, none refused.
    let (_, metrics) = http_get(&format!("{}/metrics", service.endpoint()));
    for line in [
        "qseed_entropy_source_in_use{source=\"a\"} 1",
        "qseed_entropy_source_in_use{source=\"b\"} 1",
        "qseed_entropy_source_up{source=\"b\"} 1",
        "qseed_entropy_source_health_rejected_blocks_total{source=\"a\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    assert!(metrics.contains("qseed_entropy_source_requests_total{source=\"b\"}"));
    let log_file = world.path("service.log");
    let _ = service.stop();
    let log = std::fs::read_to_string(log_file).unwrap();
    let (a_served, b_served) = (a.served(), b.served());
    assert_eq!(
        a_served.len(),
        b_served.len(),
        "one request to each, of one size"
    );
    let mixed: Vec<u8> = a_served.iter().zip(&b_served).map(|(x, y)| x ^ y).collect();
    let seeds: Vec<u8> = world.spy().seeds().concat();
    assert!(seeds.len() >= 3 * 48);
    assert_eq!(
        seeds,
        mixed[..seeds.len()],
        "the seeds are the XOR stream, in order"
    );
    // Neither source's own bytes reached the token.
    for seed in world.spy().seeds() {
        assert!(!a_served.windows(48).any(|w| w == seed.as_slice()));
        assert!(!b_served.windows(48).any(|w| w == seed.as_slice()));
    }
    assert!(log.contains("@a+b"), "{log}");
    assert!(log.contains("mixing a + b"), "{log}");
}

#[test]
fn mixing_with_one_source_down_skips_unless_told_to_fall_back() {
    let world = World::new();
    world.add_token("tok");
    let a = appliance(&world, any_port());
    let b = appliance(&world, any_port_elsewhere());
    b.stop();
    let sources = format!("{}{}", source_table("a", &a), source_table("b", &b));
    configure(&world, "sources = \"mix\"\n", &sources, 48);
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mixing needs fresh bytes from two sources, and only a answered"),
        "{}",
        stderr(&out)
    );
    assert!(
        world.spy().seeds().is_empty(),
        "nothing seeded from one source"
    );

    configure(
        &world,
        "sources = \"mix\"\nmix_fallback = \"failover\"\n",
        &sources,
        48,
    );
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mixing fell back to one source, a"),
        "{}",
        stderr(&out)
    );
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1);
    let a_served = a.served();
    assert!(a_served.windows(48).any(|w| w == seeds[0].as_slice()));
}

#[test]
fn a_device_source_reads_a_file_once_and_a_fifo() {
    let world = World::new();
    world.add_token("tok");
    let file = world.path("qrng.bin");
    let content: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &content).unwrap();
    let device = |path: &std::path::Path| {
        format!(
            "[source]\nname = \"qrng\"\nkind = \"device\"\npath = \"{}\"\ntimeout = \"2s\"\n\n",
            path.display()
        )
    };
    configure(&world, "", &device(&file), 48);
    for round in 0..2 {
        let out = world.run(&["once"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let seeds = world.spy().seeds();
        // One KiB bought per run; the second run goes on where the first stopped.
        assert_eq!(
            seeds[round],
            content[round * 1024..round * 1024 + 48],
            "run {round}"
        );
    }

    let fifo = world.path("qrng.fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    // Bytes of its own: the file's were used, and the replay check remembers them.
    let streamed: Vec<u8> = content.iter().map(|b| b ^ 0x5a).collect();
    let written = streamed.clone();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut pipe = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            // The reader closes after the KiB it needs: the rest may not go through.
            let _ = pipe.write_all(&written);
        })
    };
    configure(&world, "", &device(&fifo), 48);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seeds = world.spy().seeds();
    assert_eq!(seeds[2], streamed[..48], "the FIFO's first bytes");
    writer.join().unwrap();
}

#[test]
fn bad_sources_are_refused_with_what_to_do() {
    let world = World::new();
    world.add_token("tok");
    let sim = appliance(&world, any_port());
    for (sources, pool, says) in [
        (
            "[source]\nkind = \"radio\"\n".to_string(),
            "",
            "unknown variant `radio`",
        ),
        (
            format!(
                "[source]\nkind = \"device\"\npath = \"{}\"\n",
                world.dir.path().display()
            ),
            "",
            "is a directory; a device source reads a character device",
        ),
        (
            "[source]\nkind = \"device\"\n".to_string(),
            "",
            "kind = \"device\" needs path",
        ),
        (
            "[source]\nkind = \"device\"\npath = \"/dev/urandom\"\nurl = \"https://x\"\n".into(),
            "",
            "kind = \"device\" takes path and timeout; url belong(s) to kind = \"qrypt\"",
        ),
        (
            "[source]\nkind = \"device\"\npath = \"/no/such/qrng\"\n".into(),
            "",
            "/no/such/qrng: No such file or directory",
        ),
        (
            source_table("one", &sim),
            "sources = \"mix\"\n",
            "XORs the bytes of at least two sources, and 1 is configured",
        ),
        (
            format!(
                "{}{}",
                source_table("same", &sim),
                source_table("same", &sim)
            ),
            "",
            "two sources are named \"same\"",
        ),
        (
            "[[source]]\nname = \"x\"\nkind = \"device\"\npath = \"/dev/urandom\"\n\n\
             [[source]]\nname = \"y\"\nkind = \"device\"\npath = \"/dev/../dev/urandom\"\n"
                .into(),
            "",
            "sources \"x\" and \"y\" read the same file",
        ),
    ] {
        configure(&world, pool, &sources, 48);
        let out = world.run(&["once"]);
        assert_eq!(out.status.code(), Some(2), "{sources}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{sources}: {}", stderr(&out));
    }
    // With several sources, QSEED_SOURCE_* cannot say which it sets.
    configure(
        &world,
        "",
        &format!("{}{}", source_table("a", &sim), source_table("b", &sim)),
        48,
    );
    let out = world
        .qseed()
        .env("QSEED_SOURCE_TIMEOUT", "5s")
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot say which of the 2 [[source]] tables"));
    assert_eq!(sim.requests(), 0);
}

#[test]
fn fetch_and_doctor_know_each_source() {
    let (world, a, b) = two_appliances("");
    let out = world
        .qseed()
        .args(["fetch", "--bytes", "1K", "--source", "b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b.served()[..1024]);
    assert_eq!(a.requests(), 0);
    let out = world.run(&["fetch", "--bytes", "1K", "--source", "c"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no such source; the configuration has \"a\", \"b\""));

    let out = world.run(&["doctor"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", stderr(&out));
    for line in [
        "source a (http://",
        "source b (http://",
        "1 KiB in",
        "sources in use (failover): a",
    ] {
        assert!(report.contains(line), "{line}: {report}");
    }
}
