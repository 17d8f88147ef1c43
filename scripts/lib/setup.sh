# Installs what qseed's build, tests and demo need on Debian or Ubuntu. Sourced by
# scripts/test, scripts/demo, scripts/package and scripts/bench-modules; safe to run again (it
# only installs what is missing).

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
[ -e /usr/lib/x86_64-linux-gnu/pkcs11-spy.so ] || [ -e /usr/lib/aarch64-linux-gnu/pkcs11-spy.so ] || need_apt+=(opensc-pkcs11)
[ -d /etc/ssl/certs ] && [ -n "$(ls -A /etc/ssl/certs 2>/dev/null)" ] || need_apt+=(ca-certificates)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v curl >/dev/null 2>&1 || command -v cargo >/dev/null 2>&1 || need_apt+=(curl)
# The test suite's other PKCS#11 modules (scripts/test and scripts/bench-modules set
# QSEED_SETUP=test; the demo and the package build do not need them).
if [ "${QSEED_SETUP:-}" = "test" ]; then
    # p11-kit's server and client: a PKCS#11 module in another process, for the device-loss tests.
    command -v p11-kit >/dev/null 2>&1 || need_apt+=(p11-kit)
    [ -e /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so ] || [ -e /usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so ] || need_apt+=(p11-kit-modules)
    [ -e /usr/lib/x86_64-linux-gnu/libsoftokn3.so ] || [ -e /usr/lib/aarch64-linux-gnu/libsoftokn3.so ] || need_apt+=(libnss3)
    command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
    # tpm2-pkcs11 on a software TPM: a seed that leaves the process and reaches a (software) device.
    command -v swtpm >/dev/null 2>&1 || need_apt+=(swtpm swtpm-tools)
    command -v tpm2_ptool >/dev/null 2>&1 || need_apt+=(libtpm2-pkcs11-tools tpm2-tools)
    [ -e /usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so ] || [ -e /usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so ] || need_apt+=(libtpm2-pkcs11-1)
    command -v tpm2-abrmd >/dev/null 2>&1 || need_apt+=(tpm2-abrmd libtss2-tcti-tabrmd0)
    command -v dbus-daemon >/dev/null 2>&1 || need_apt+=(dbus)
    command -v strace >/dev/null 2>&1 || need_apt+=(strace)
    # tests/audit.rs makes the EC key the ledger is signed with.
    command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
    # Caml Crush: a PKCS#11 proxy whose client recovers only by being loaded again (tests/caml_crush.rs).
    command -v pkcs11proxyd >/dev/null 2>&1 || need_apt+=(caml-crush-server)
    [ -e /usr/lib/x86_64-linux-gnu/caml-crush/libp11clientunix.so ] || [ -e /usr/lib/aarch64-linux-gnu/caml-crush/libp11clientunix.so ] || need_apt+=(caml-crush-clients)
    # scripts/kryoptic builds Kryoptic from crates.io: bindgen needs libclang, and it links
    # Debian's OpenSSL and SQLite.
    [ -e /usr/lib/llvm-14/lib/libclang.so ] || compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || need_apt+=(libclang-dev)
    [ -e /usr/include/openssl/evp.h ] || need_apt+=(libssl-dev)
    [ -e /usr/include/sqlite3.h ] || need_apt+=(libsqlite3-dev)
    command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
    # openCryptoki: a token with odd token info that refuses seeds.
    [ -x /usr/sbin/pkcsslotd ] || need_apt+=(opencryptoki)
    # scripts/package-check and scripts/bench-modules pick free ports with it.
    command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
    # scripts/fuzz builds libFuzzer (C++) through libfuzzer-sys.
    command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
    # The man pages are rendered and indexed as man-db would (tests/cli.rs).
    command -v lexgrog >/dev/null 2>&1 || need_apt+=(man-db groff-base)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> apt-get install ${need_apt[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The monitoring kit's tests run promtool and a real Prometheus (tests/monitoring.rs); without
# its recommends, so no node exporter or web assets come along.
if [ "${QSEED_SETUP:-}" = "test" ] && ! command -v prometheus >/dev/null 2>&1; then
    echo "==> apt-get install prometheus"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    # Debian's own rustc is older than qseed's minimum (1.85): use rustup's stable toolchain.
    echo "==> installing the Rust toolchain with rustup (https://rustup.rs)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" \
            || rustup component add "$component" >/dev/null 2>&1 || true
    done
fi
# The supply-chain check (deny.toml): licenses, bans, duplicate versions, sources.
if [ "${QSEED_SETUP:-}" = "test" ] && ! command -v cargo-deny >/dev/null 2>&1; then
    echo "==> cargo install cargo-deny (the supply-chain check; a few minutes, once)"
    cargo install --locked cargo-deny@0.20.2
fi
