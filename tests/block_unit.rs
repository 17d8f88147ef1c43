//! Issue 25: `POST /api/v1/entropy`'s `block_size` read in bytes (the appliance's
//! specification) or in KiB (Qrypt's qseed): with `block_unit = "auto"` qseed seeds from both,
//! byte-exact through pkcs11-spy, from the first round; a fixed unit against the other reading
//! fails with a message that names `block_unit` and the fix.

mod common;

use common::*;

/// A world with token "tok" seeded through the POST dialect with `block_unit` (none: the
/// default), against a simulator that reads KiB when `kib_server`.
fn post_world(block_unit: Option<&str>, kib_server: bool) -> World {
    let world = World::one_target("entropy", 48, "10s", false);
    world.sim.set_block_size_in_kib(kib_server);
    if let Some(unit) = block_unit {
        let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
        world.write_config(&config.replace(
            "dialect = \"entropy\"\n",
            &format!("dialect = \"entropy\"\nblock_unit = \"{unit}\"\n"),
        ));
    }
    world
}

#[test]
fn auto_seeds_from_a_server_that_reads_bytes_at_once() {
    let world = post_world(None, false);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.sim.requests(), 1, "no probe against a bytes server");
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1);
    assert_seeds_tile_served(&seeds, &world.sim.served());
}

#[test]
fn auto_seeds_from_a_server_that_reads_kib_after_one_failed_request_and_remembers() {
    let world = post_world(None, true);
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        world.sim.requests(),
        2,
        "one refused request, then KiB: {text}"
    );
    assert!(
        text.contains("reads block_size in KiB")
            && text.contains("it refused block_size 1024 with HTTP 400"),
        "{text}"
    );
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1, "seeded in the first round");
    assert_seeds_tile_served(&seeds, &world.sim.served());

    // The next process asks in KiB at once: no failed request, nothing said again.
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.sim.requests(), 3);
    assert!(!stderr(&out).contains("reads block_size in KiB"));
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 2);
    assert_seeds_are_distinct_served_bytes(&seeds, &world.sim.served());

    // doctor and the metrics say which unit is in use.
    let out = world.run(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("block_size is read in kib (source.block_unit = \"auto\")"),
        "{text}"
    );
    let service = world.start_service();
    let endpoint = service.endpoint();
    let (status, body) = http_get(&format!("{endpoint}/metrics"));
    assert_eq!(status, 200);
    assert!(
        body.contains("qseed_entropy_source_block_unit{source=\"localhost\",unit=\"kib\"} 1"),
        "{body}"
    );
    drop(service);
}

#[test]
fn a_fixed_unit_against_the_other_reading_names_block_unit_and_the_fix() {
    // "kib" against a server that reads bytes: one-byte blocks come back, refused whole.
    let world = post_world(Some("kib"), false);
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("reads block_size in bytes")
            && text.contains("source.block_unit = \"kib\"")
            && text.contains("set block_unit = \"bytes\""),
        "{text}"
    );
    assert!(
        world.spy().seeds().is_empty(),
        "nothing of a misread answer injected"
    );
    assert_eq!(world.sim.requests(), 1, "no probe with a fixed unit");

    // "bytes" against a server that reads KiB: its 400, explained.
    let world = post_world(Some("bytes"), true);
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("reads block_size in KiB")
            && text.contains("source.block_unit = \"bytes\"")
            && text.contains("set block_unit = \"kib\""),
        "{text}"
    );
    assert!(world.spy().seeds().is_empty());

    // Each fixed unit against its own reading seeds.
    for (unit, kib) in [("bytes", false), ("kib", true)] {
        let world = post_world(Some(unit), kib);
        let out = world.run(&["once"]);
        assert!(out.status.success(), "{unit}: {}", stderr(&out));
        assert_eq!(world.sim.requests(), 1);
        assert_seeds_tile_served(&world.spy().seeds(), &world.sim.served());
    }
}

#[test]
fn block_unit_belongs_to_the_post_dialect_and_comes_from_the_environment_too() {
    let world = World::one_target("quantum-entropy", 48, "10s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(
        "dialect = \"quantum-entropy\"\n",
        "dialect = \"quantum-entropy\"\nblock_unit = \"kib\"\n",
    ));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("block_unit applies to dialect = \"entropy\""),
        "{}",
        stderr(&out)
    );
    // QSEED_SOURCE_BLOCK_UNIT, against a KiB server.
    let world = post_world(None, true);
    let out = world
        .qseed()
        .env("QSEED_SOURCE_BLOCK_UNIT", "kib")
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.sim.requests(), 1, "asked in KiB from the start");
}
