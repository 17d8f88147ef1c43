//! Start-up is linear in the number of tokens: targets of one module share a discovery of its
//! tokens instead of each reading every slot (65,792 `C_GetTokenInfo` calls for 256 tokens).

mod common;

use common::*;

#[test]
fn targets_of_one_module_share_the_token_discovery() {
    const N: usize = 16;
    let world = World::new();
    let mut config = world.source("entropy");
    for i in 0..N {
        world.add_token(&format!("t{i}"));
        config.push_str(&world.target(&format!("t{i}"), &format!("t{i}"), 48, "10s", false));
    }
    world.write_config(&config);
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Every target seeded (told by the audit records: the spy's log of concurrent calls
    // interleaves, so its seed dumps cannot all be read back).
    assert_eq!(
        stderr(&out).matches("INFO seeded t").count(),
        N,
        "{}",
        stderr(&out)
    );
    let spy = world.spy();
    let infos = spy.count("C_GetTokenInfo");
    // One discovery (N slots) and one fresh look at each target's own token: 2N, where each
    // target reading every slot took N².
    assert!(
        infos <= 3 * N,
        "{infos} C_GetTokenInfo calls for {N} tokens"
    );
    assert!(infos >= N, "{infos}");
}

#[test]
fn threads_are_bounded_by_the_pool_not_by_the_number_of_targets() {
    const N: usize = 48;
    let world = World::new();
    let mut config = world.source("entropy");
    for i in 0..N {
        world.add_token(&format!("t{i}"));
        config.push_str(&world.target(&format!("t{i}"), &format!("t{i}"), 48, "1s", false));
    }
    world.write_config(&config);
    let service = world.start_service();
    assert!(
        wait_until(std::time::Duration::from_secs(20), || service
            .log()
            .matches("INFO seeded t")
            .count()
            >= 3 * N),
        "{}",
        service.log()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", service.pid())).unwrap();
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // 32 blocking threads at most, the runtime's workers, and a few of its own.
    assert!(threads <= 32 + 8, "{threads} threads for {N} targets");
    let _ = service.stop();
}
