//! Naming tokens and modules the way the PKCS#11 ecosystem does: RFC 7512 URIs (with the module
//! and PIN inside), p11-kit module names, and p11-kit's proxy module, which renumbers slots.

mod common;

use common::*;

const PROXY: &str = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so";

fn serial(world: &World, label: &str) -> String {
    let out = world.run(&["slots", "--module", SOFTHSM]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Fixed columns: SLOT 12, TOKEN 7, LABEL 32, SERIAL 16 (labels may hold spaces).
    text.lines()
        .find(|l| l.get(21..53).map(str::trim) == Some(label))
        .and_then(|l| l.get(54..70))
        .unwrap_or_else(|| panic!("{text}"))
        .trim()
        .to_string()
}

fn target(name: &str, keys: &str) -> String {
    format!("[[target]]\nname = \"{name}\"\nsize = 48\nperiod = \"10s\"\n{keys}\n")
}

#[test]
fn a_uri_names_the_token_the_module_and_the_pin() {
    let world = World::new();
    world.add_token("other");
    world.add_token("my token");
    let serial = serial(&world, "my token");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        target(
            "by-uri",
            &format!(
                "token = \"pkcs11:token=my%20token;serial={serial}?module-path={SPY}&pin-source=file:user.pin\""
            )
        )
    ));
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("seeded by-uri: 48 bytes into token \"my token\""));
    assert_eq!(world.spy().logins_with(PIN), 1, "pin-source was read");
    assert_eq!(world.spy().seeds().len(), 1);

    // `slots` prints URIs that select the same token.
    let out = world.run(&["slots", "--module", SOFTHSM]);
    let text = String::from_utf8_lossy(&out.stdout);
    let uri = text
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .nth(1)
                .filter(|u| u.ends_with("token=my%20token"))
        })
        .unwrap_or_else(|| panic!("{text}"))
        .to_string();
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        target(
            "pasted",
            &format!("token = \"{uri}\"\nmodule = \"{SPY}\"\nlogin = \"none\"")
        )
    ));
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 2);
}

#[test]
fn uri_mistakes_are_named() {
    let world = World::new();
    world.add_token("tok");
    for (keys, expected) in [
        (
            "module = \"/x.so\"\ntoken_label = \"pkcs11:token=tok\"".to_string(),
            "token_label holds a PKCS#11 URI; write it as token",
        ),
        (
            format!("module = \"{SPY}\"\ntoken = \"pkcs11:tokn=tok\""),
            "token: unknown path attribute \"tokn\"",
        ),
        (
            format!("token = \"pkcs11:token=tok?module-path={SOFTHSM}\"\nmodule = \"{SPY}\""),
            "but the token URI names module",
        ),
        (
            format!("module = \"{SPY}\"\ntoken = \"pkcs11:token=tok?pin-value=31337\"\npin_file = \"user.pin\""),
            "keep one",
        ),
    ] {
        world.write_config(&format!("{}{}", world.source("entropy"), target("t", &keys)));
        let out = world.run(&["once"]);
        assert_eq!(out.status.code(), Some(2), "{keys}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{keys}: {}", stderr(&out));
        assert!(!stderr(&out).contains("31337"), "{}", stderr(&out));
    }
}

#[test]
fn p11_kit_names_and_its_proxy_find_tokens_through_renumbered_slots() {
    if !std::path::Path::new(PROXY).exists() {
        panic!("{PROXY} is missing: apt-get install p11-kit (scripts/test does)");
    }
    let world = World::new();
    world.add_token("tok");
    let serial = serial(&world, "tok");
    // The proxy loads every registered module (SoftHSM's among them): slots from 17 up.
    let out = world.run(&["slots", "--module", PROXY]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("tok"))
        .unwrap_or_else(|| panic!("{text}"));
    let slot: u64 = row.split_whitespace().next().unwrap().parse().unwrap();
    assert!(slot >= 16, "renumbered: {row}");
    for (name, keys) in [
        ("label", "token_label = \"tok\"".to_string()),
        ("serial", format!("serial = \"{serial}\"")),
        (
            "uri",
            format!("token = \"pkcs11:token=tok;serial={serial}\""),
        ),
    ] {
        world.write_config(&format!(
            "{}{}",
            world.source("entropy"),
            target(
                name,
                &format!("module = \"{PROXY}\"\n{keys}\nlogin = \"none\"")
            )
        ));
        let out = world.run(&["once"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("seeded {name}: 48 bytes into token \"tok\"")),
            "{}",
            stderr(&out)
        );
    }
    // A p11-kit module name for `module`, and in a URI.
    for keys in [
        "module = \"softhsm2\"\ntoken_label = \"tok\"",
        "token = \"pkcs11:token=tok?module-name=softhsm2\"",
    ] {
        world.write_config(&format!(
            "{}{}",
            world.source("entropy"),
            target("named", &format!("{keys}\nlogin = \"none\""))
        ));
        let out = world.run(&["once"]);
        assert!(out.status.success(), "{keys}: {}", stderr(&out));
    }
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        target(
            "named",
            "module = \"no-such-module\"\ntoken_label = \"tok\""
        )
    ));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("registered p11-kit module; registered:")
            && stderr(&out).contains("softhsm2"),
        "{}",
        stderr(&out)
    );
}
