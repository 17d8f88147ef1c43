//! NSS's softoken, a module that needs initialization parameters (`init_args`, passed to
//! `C_Initialize` as pReserved): seeded through the spy, and refused with a message about
//! initialization (not about seeds) when the parameters are missing.

mod common;

use common::*;

const NSS: &str = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so";
const ARGS: &str = "configdir='' certPrefix='' keyPrefix='' secmod='' flags=noCertDB,noModDB";

#[test]
fn nss_softoken_is_seeded_with_init_args() {
    assert!(
        std::path::Path::new(NSS).exists(),
        "{NSS} is missing: apt-get install libnss3"
    );
    let world = World::new();
    let target = world
        .target("nss", "NSS Generic Crypto Services", 48, "10s", false)
        .replace("offset", &format!("init_args = \"{ARGS}\"\noffset"));
    world.write_config(&format!("{}{target}", world.source("entropy")));
    let out = world
        .qseed()
        .env("PKCS11SPY", NSS)
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1);
    assert_eq!(seeds[0], world.sim.served()[..48].to_vec());

    // Without init_args: a C_Initialize problem, said as such, before anything is bought.
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("nss", "NSS Generic Crypto Services", 48, "10s", false)
    ));
    let out = world
        .qseed()
        .env("PKCS11SPY", NSS)
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("C_Initialize: CKR_ARGUMENTS_BAD")
            && text.contains("set init_args")
            && !text.contains("size"),
        "{text}"
    );
    assert_eq!(
        world.sim.requests(),
        1,
        "nothing bought for the refused start"
    );
}
