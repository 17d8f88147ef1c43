//! Issue 23, item 4: the tamper-evident audit ledger of a real `qseed run` and `once`.

mod common;

use std::time::Duration;

use common::*;

fn ledger_path(world: &World) -> std::path::PathBuf {
    world.path("state").join("audit").join("ledger.jsonl")
}

#[test]
fn every_injection_is_chained_in_the_ledger_and_an_edit_is_found() {
    let world = World::one_target("entropy", 48, "1s", false);
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(3, Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let (status, _) = service.stop();
    assert!(status.success());
    // A second process appends to the same chain.
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let seeds = world.spy().seeds();
    let text = std::fs::read_to_string(ledger_path(&world)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), seeds.len(), "one record per seed: {text}");
    for line in &lines {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["event"], "injection");
        assert_eq!(record["target"], "tok");
        assert_eq!(record["token_label"], "tok");
        assert_eq!(record["bytes"], 48);
        assert!(record["request_ids"].as_str().unwrap().starts_with('r'));
        assert_eq!(record["prev"].as_str().unwrap().len(), 64);
    }
    // No seed byte is in the ledger, in hex or otherwise.
    for seed in &seeds {
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex[..32]));
    }

    let out = world.run(&["audit", "verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "{} record(s) in 1 file(s): the chain is intact",
            lines.len()
        )),
        "{said}"
    );

    let out = world.run(&["audit", "export", "--since", "2000-01-01T00:00:00Z"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    let out = world.run(&["audit", "export", "--until", "2000-01-01T00:00:00Z"]);
    assert!(out.stdout.is_empty());

    // One edited line: the chain breaks at the line after it.
    let edited = text.replacen("\"bytes\":48", "\"bytes\":4800", 1);
    std::fs::write(ledger_path(&world), edited).unwrap();
    let out = world.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the chain breaks at record 2"),
        "{}",
        stderr(&out)
    );
}
