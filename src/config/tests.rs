use std::path::Path;

use secrecy::ExposeSecret;

use super::*;
use crate::source::Dialect;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn parse_ok(text: &str) -> Config {
    parse(text, Path::new("/etc/qseed")).unwrap_or_else(|e| panic!("{e}"))
}

fn parse_err(text: &str) -> String {
    match parse(text, Path::new("/etc/qseed")) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => e,
    }
}

fn target(extra: &str) -> String {
    format!(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"t1\"\nmodule = \"{MODULE}\"\n{extra}\n"
    )
}

#[test]
fn full_example_resolves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("qrypt.token"), "tok-123\n").unwrap();
    std::fs::write(dir.path().join("luna.pin"), "1234\r\n").unwrap();
    let text = r#"
        [source]
        url = "https://api-eus.qrypt.com"
        dialect = "entropy"
        token_file = "qrypt.token"
        timeout = "30s"

        [[target]]
        name = "luna-partition-1"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "qseed-test"
        login = "user"
        pin_file = "luna.pin"
        size = 64
        period = "1h 30m"
        offset = "250ms"

        [[target]]
        name = "second"
        module = "lib/module.so"
        slot_id = 3
    "#;
    let config = parse(text, dir.path()).unwrap();
    assert_eq!(config.qrypt().unwrap().dialect, Dialect::Entropy);
    assert_eq!(
        config
            .qrypt()
            .unwrap()
            .token
            .as_ref()
            .unwrap()
            .expose_secret(),
        "tok-123"
    );
    assert_eq!(config.qrypt().unwrap().timeout, Duration::from_secs(30));
    let t = &config.targets[0];
    assert_eq!(t.token, TokenSelector::Label("qseed-test".into()));
    assert_eq!(t.login.as_ref().unwrap().pin.expose_secret(), "1234");
    assert_eq!(t.size, 64);
    assert_eq!(t.period, Duration::from_secs(5400));
    assert_eq!(t.offset, Duration::from_millis(250));
    let t2 = &config.targets[1];
    assert_eq!(t2.module, dir.path().join("lib/module.so"));
    assert_eq!(t2.token, TokenSelector::SlotId(3));
    assert!(t2.login.is_none());
    assert_eq!(t2.size, DEFAULT_SIZE);
    assert_eq!(t2.period, DEFAULT_PERIOD);
    assert_eq!(t2.offset, Duration::ZERO);
}

#[test]
fn pool_limits_have_defaults_and_ranges() {
    let c = parse_ok("[source]\nauth = \"none\"\n");
    assert_eq!(c.pool, crate::pool::PoolConfig::default());
    let c = parse_ok(
        "[source]\nauth = \"none\"\n[pool]\nmax_bytes = 131072\nmax_age = \"2h\"\n\
         horizon = \"1m\"\nmin_entropy = 7.5\nfalse_alarm = 1e-9\n",
    );
    assert_eq!(c.pool.max_bytes, 131072);
    assert_eq!(c.pool.max_age, Duration::from_secs(7200));
    assert_eq!(c.pool.horizon, Duration::from_secs(60));
    assert_eq!(c.pool.health.min_entropy, 7.5);
    for (extra, want) in [
        ("max_bytes = 100", "pool.max_bytes = 100 is out of range"),
        (
            "max_age = \"1s\"",
            "pool.max_age = 1s is out of range: allowed 1m to 30d",
        ),
        ("min_entropy = 9.0", "pool.min_entropy = 9 is out of range"),
        (
            "false_alarm = 0.5",
            "pool.false_alarm = 0.5 is out of range",
        ),
        // Review: this pair let an all-zero block through.
        (
            "false_alarm = 1e-320\nmin_entropy = 1.0",
            "pool.false_alarm = 1e-320 is out of range: allowed 2^-64",
        ),
        (
            "false_alarm = nan",
            "pool.false_alarm = NaN is out of range",
        ),
        (
            "min_entropy = nan",
            "pool.min_entropy = NaN is out of range",
        ),
        ("maxbytes = 1", "unknown field `maxbytes`"),
    ] {
        let e = parse_err(&format!("[source]\nauth = \"none\"\n[pool]\n{extra}\n"));
        assert!(e.contains(want), "{extra}: {e}");
    }
}

#[test]
fn unknown_keys_are_errors_with_position() {
    let e = parse_err(&target("token_label = \"a\"\nperiode = \"10s\""));
    assert!(e.contains("unknown field `periode`"), "{e}");
    assert!(e.contains("line 7"), "{e}");
    let e = parse_err("[source]\nurll = \"https://x\"\n");
    assert!(e.contains("unknown field `urll`"), "{e}");
}

#[test]
fn ranges_name_key_value_and_allowed_range() {
    for (extra, want) in [
        ("size = 0", "size = 0 is out of range: allowed 1..=65536"),
        ("size = 65537", "size = 65537 is out of range"),
        ("size = -5", "size = -5 is out of range"),
        (
            "period = \"500ms\"",
            "period = 500ms is out of range: allowed 1s to 365d",
        ),
        ("period = \"366d\"", "period = 366d is out of range"),
        ("period = \"soon\"", "\"soon\" is not a duration"),
        (
            "offset = \"10s\"",
            "offset = 10s is out of range: allowed 0s up to (not including) period = 10s",
        ),
    ] {
        let e = parse_err(&target(&format!("token_label = \"a\"\n{extra}")));
        assert!(e.contains(want), "{extra}: {e}");
        assert!(e.contains("t1") || e.contains("line"), "{extra}: {e}");
    }
}

#[test]
fn exactly_one_token_selector() {
    let e = parse_err(&target(""));
    assert!(e.contains("no token given"), "{e}");
    let e = parse_err(&target("token_label = \"a\"\nserial = \"b\""));
    assert!(
        e.contains("more than one of token, token_label, serial and slot_id"),
        "{e}"
    );
    let e = parse_err(&target("token_label = \"a\"\ntoken = \"pkcs11:token=a\""));
    assert!(e.contains("more than one of token, token_label"), "{e}");
    let c = parse_ok(&target("token = \"pkcs11:token=a%20b;serial=7\""));
    assert!(matches!(&c.targets[0].token, TokenSelector::Uri(u) if u.path.len() == 2));
}

#[test]
fn at_most_one_pin_source() {
    let e = parse_err(&target("token_label = \"a\"\npin = \"1\"\npin_env = \"X\""));
    assert!(
        e.contains("more than one of pin_file, pin_env and pin"),
        "{e}"
    );
    let e = parse_err(&target("token_label = \"a\"\nlogin = \"user\""));
    assert!(e.contains("needs a PIN"), "{e}");
    let e = parse_err(&target(
        "token_label = \"a\"\nlogin = \"none\"\npin = \"1\"",
    ));
    assert!(e.contains("login = \"none\""), "{e}");
}

#[test]
fn a_mistyped_pin_is_never_quoted() {
    let e = parse_err(&target("token_label = \"a\"\npin = 987654"));
    assert!(!e.contains("987654"), "{e}");
    assert!(e.contains("must be a quoted string"), "{e}");
    // And the resolved PIN never shows in Debug output.
    let config = parse_ok(&target("token_label = \"a\"\npin = \"987654\""));
    assert!(!format!("{config:?}").contains("987654"));
}

#[test]
fn plain_http_needs_opt_in() {
    let e = parse_err("[source]\nurl = \"http://127.0.0.1:8080\"\nauth = \"none\"\n");
    assert!(e.contains("plain HTTP"), "{e}");
    assert!(e.contains("allow_http = true"), "{e}");
    let c =
        parse_ok("[source]\nurl = \"http://127.0.0.1:8080\"\nallow_http = true\nauth = \"none\"\n");
    assert_eq!(c.qrypt().unwrap().url.scheme(), "http");
}

#[test]
fn duplicate_names_and_tokens_are_refused() {
    let two = format!(
        "{}[[target]]\nname = \"t1\"\nmodule = \"{MODULE}\"\ntoken_label = \"b\"\n",
        target("token_label = \"a\"")
    );
    assert!(parse_err(&two).contains("two targets are named \"t1\""));
    let same_token = format!(
        "{}[[target]]\nname = \"t2\"\nmodule = \"{MODULE}\"\ntoken_label = \"a\"\n",
        target("token_label = \"a\"")
    );
    assert!(parse_err(&same_token).contains("same token"));
}

#[test]
fn names_must_be_log_safe() {
    let e = parse_err(&format!(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"a b\"\nmodule = \"{MODULE}\"\ntoken_label = \"x\"\n"
    ));
    assert!(e.contains("letters, digits"), "{e}");
}

#[test]
fn missing_secret_files_are_named() {
    let e = parse_err("[source]\ntoken_file = \"/nonexistent/qrypt.token\"\n");
    assert!(
        e.contains("source.token_file = \"/nonexistent/qrypt.token\" cannot be read"),
        "{e}"
    );
}

#[test]
fn max_seed_is_checked() {
    let c = parse_ok(&target("slot_id = 1\nmax_seed = 128"));
    assert_eq!(c.targets[0].max_seed, Some(128));
    assert_eq!(parse_ok(&target("slot_id = 1")).targets[0].max_seed, None);
    let e = parse_err(&target("slot_id = 1\nmax_seed = 0"));
    assert!(e.contains("max_seed = 0 is out of range"), "{e}");
}

#[test]
fn telemetry_addresses_as_operators_write_them() {
    let listen = |v: &str| {
        parse_ok(&format!(
            "[source]\nauth = \"none\"\n[telemetry]\nlisten = \"{v}\"\n"
        ))
        .telemetry_listen
        .map(|a| a.to_string())
    };
    assert_eq!(listen("127.0.0.1:9750").as_deref(), Some("127.0.0.1:9750"));
    assert_eq!(listen("localhost:9751").as_deref(), Some("127.0.0.1:9751"));
    assert_eq!(listen("[::1]:9752").as_deref(), Some("[::1]:9752"));
    assert_eq!(listen(":9753").as_deref(), Some("0.0.0.0:9753"));
    assert_eq!(listen("off"), None);
    let e = parse_err("[source]\nauth = \"none\"\n[telemetry]\nlisten = \"example.com:1\"\n");
    assert!(e.contains("is not an address"), "{e}");
}

/// Issue 23, item 1: a kernel target takes the timing keys and `credit`, and refuses the
/// PKCS#11 ones; `credit` on a PKCS#11 target is refused.
#[test]
fn a_kernel_target_takes_timing_and_credit_only() {
    let config = parse_ok(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"host\"\nkind = \"kernel\"\nsize = 64\n\
         period = \"30s\"\n",
    );
    assert_eq!(
        config.targets[0].kind,
        TargetKind::Kernel {
            credit: crate::kernel::Credit::None
        }
    );
    assert_eq!(config.targets[0].size, 64);
    let full = parse_ok(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"host\"\nkind = \"kernel\"\ncredit = \"full\"\n",
    );
    assert_eq!(
        full.targets[0].kind,
        TargetKind::Kernel {
            credit: crate::kernel::Credit::Full
        }
    );
    let e = parse_err(&format!(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"host\"\nkind = \"kernel\"\nmodule = \"{MODULE}\"\ntoken_label = \"x\"\n"
    ));
    assert!(
        e.contains("module, token_label belong(s) to PKCS#11 targets"),
        "{e}"
    );
    let e = parse_err(&target("token_label = \"x\"\ncredit = \"full\""));
    assert!(
        e.contains("credit applies to kind = \"kernel\" only"),
        "{e}"
    );
    let e = parse_err(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"host\"\nkind = \"kernel\"\ncredit = \"some\"\n",
    );
    assert!(e.contains("expected `none` or `full`"), "{e}");
}

/// Issue 23, item 4: `[audit] sign_with` names a PKCS#11 target; its other keys need it.
#[test]
fn audit_signing_names_a_pkcs11_target() {
    let ok = parse_ok(&format!(
        "{}\n[audit]\nsign_with = \"t1\"\nsign_every = \"10m\"\n",
        target("token_label = \"x\"")
    ));
    assert_eq!(
        ok.audit_signing,
        Some(AuditSigning {
            target: "t1".into(),
            key_label: DEFAULT_AUDIT_KEY_LABEL.into(),
            every: Duration::from_secs(600),
        })
    );
    let e = parse_err(&format!(
        "{}\n[audit]\nsign_with = \"nope\"\n",
        target("token_label = \"x\"")
    ));
    assert!(e.contains("names no target"), "{e}");
    let e = parse_err(&format!(
        "{}\n[audit]\nkey_label = \"k\"\n",
        target("token_label = \"x\"")
    ));
    assert!(e.contains("need audit.sign_with"), "{e}");
    let e = parse_err(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"host\"\nkind = \"kernel\"\n\
         [audit]\nsign_with = \"host\"\n",
    );
    assert!(e.contains("is a kernel target"), "{e}");
    let e = parse_err(
        "[source]\nauth = \"none\"\n[[target]]\nname = \"k1\"\nkind = \"kernel\"\n\
         [[target]]\nname = \"k2\"\nkind = \"kernel\"\n",
    );
    assert!(e.contains("second kind = \"kernel\" target"), "{e}");
}
