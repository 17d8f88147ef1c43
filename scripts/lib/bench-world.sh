# The world the injection benchmarks run in (bench-injection, bench-ab, bench-instructions):
# SoftHSM tokens t1..tN, state folders with a full replay record, the API simulator, and a
# configuration of N targets. Sourced; expects $work (a scratch folder the caller removes).

# SoftHSM with tokens t1..t$1 in $work/tokens; exports SOFTHSM2_CONF.
world_tokens() {
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" > "$work/softhsm2.conf"
    mkdir -p "$work/tokens"
    export SOFTHSM2_CONF=$work/softhsm2.conf
    local i
    for i in $(seq "$1"); do
        softhsm2-util --init-token --free --label "t$i" --so-pin 12345678 --pin 1234 >/dev/null
    done
}

# A state folder at $1 in the steady state: the replay record full (65,536 blocks), as an
# agent's is after its first 64 MiB (a fresh one would flatter RSS by up to 1.7 MiB), with its
# key (digests without their key are a damaged record, which qseed refuses to start with).
world_state() {
    mkdir -p -m 700 "$1" "$1/replay"
    head -c $((65536 * 16)) /dev/urandom > "$1/replay/seen"
    head -c 32 /dev/urandom > "$1/replay/key"
    chmod 600 "$1/replay/seen" "$1/replay/key"
}

# The simulator of qseed build $1 on a free port of 127.0.0.1: sets $port and $sim (its pid,
# for the caller's cleanup), writes $work/ca.pem and the API token file $work/token.
world_simulator() {
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    QRYPT_TOKEN=bench "$1" simulator --listen "127.0.0.1:$port" --ca-out "$work/ca.pem" >/dev/null 2>&1 &
    sim=$!
    local _
    for _ in $(seq 50); do [ -s "$work/ca.pem" ] && break; sleep 0.1; done
    printf 'bench\n' > "$work/token"; chmod 600 "$work/token"
}

# Prints a configuration of $1 targets, 48 B every 1 s, at offset 0 (layout $2 = aligned) or
# target k at k x 1000/N ms (spread); $3 is one more [source] line (allow_simulated, or none
# for older builds that do not know the key).
world_config() {
    printf '[telemetry]\nlisten = "off"\n\n[source]\nurl = "https://127.0.0.1:%s"\n' "$port"
    printf 'token_file = "token"\nca_file = "ca.pem"\n%s\n' "$3"
    local i offset
    for i in $(seq "$1"); do
        offset=0
        [ "$2" = spread ] && offset=$(( (i - 1) * 1000 / $1 ))
        printf '[[target]]\nname = "t%s"\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "t%s"\nsize = 48\nperiod = "1s"\noffset = "%sms"\n\n' "$i" "$i" "$offset"
    done
}

# Injections logged in $1 whose event time falls from unix time $2 to $3 (ns). A timer thread's
# lines reach the log up to a second after their event (ledger::OWN_RECORDS_DELAY), so lines
# counted at two instants would be off by up to a second of injections: count after the stop.
world_seeded_between() {
    python3 - "$@" <<'PY'
import re, sys
from datetime import datetime
t0, t1 = int(sys.argv[2]) / 1e9, int(sys.argv[3]) / 1e9
seen = 0
for line in open(sys.argv[1]):
    m = re.match(r"(\S+Z) +INFO seeded t\d+:", line)
    if m and t0 <= datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp() < t1:
        seen += 1
print(seen)
PY
}
