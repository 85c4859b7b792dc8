#!/usr/bin/env bash
# The engine's own figures (issue: engine and `sluice run`), each against `sluice sim` on
# this machine, client and simulator as separate processes:
#   1. unpaced: 20,000 requests, simulator latency 0, no limits -> client CPU per request
#   2. paced:   10,000 requests at 6,000 RPM, simulator enforcing 6,000 RPM, latency 300 ms
#               -> wall time against the ideal 100 s, 429s, client CPU
#   3. memory:  1,000,000 requests unpaced -> client peak RSS
# Client CPU is user+sys of the sluice process alone (GNU time); the simulator's is not
# counted. Results go to bench/out/engine.md and stdout.
#
#   bench/engine.sh            # all three
#   bench/engine.sh unpaced    # one
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p sluice-cli >&2
bin="$PWD/target/release/sluice"
out=bench/out
mkdir -p "$out"
only="${1:-all}"

gen() { # gen N FILE
    python3 bench/gen_requests.py "$1" "$2"
}

sim_pid=""
start_sim() { # start_sim FLAGS... ; sets $base
    "$bin" sim --port 0 "$@" > "$out/sim.log" 2>&1 &
    sim_pid=$!
    for _ in $(seq 100); do
        if grep -q "listening on" "$out/sim.log"; then break; fi
        sleep 0.1
    done
    base="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$out/sim.log" | head -1)"
}
stop_sim() { kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; }
trap stop_sim EXIT

measure() { # measure NAME N -- ARGS... ; runs the client under GNU time
    local name=$1 n=$2; shift 3
    /usr/bin/time -f "%U %S %M %e" -o "$out/$name.time" \
        "$bin" run "$out/in-$n.jsonl" -o "$out/$name.out.jsonl" --base-url "$base" --fresh \
        --no-progress --report "$out/$name.report.json" "$@" 2> "$out/$name.stderr" || true
    python3 - "$name" "$n" "$out" <<'PY'
import json, sys
name, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
u, s, rss_kb, wall = open(f"{out}/{name}.time").read().split()
r = json.load(open(f"{out}/{name}.report.json"))
cpu = float(u) + float(s)
lines = sum(1 for _ in open(f"{out}/{name}.out.jsonl"))
ideal = r.get("ideal_secs")
row = {
    "scenario": name, "requests": n, "output_lines": lines, "succeeded": r["succeeded"],
    "failed": r["failed"], "wall_s": round(r["wall_secs"], 2),
    "ideal_s": round(ideal, 2) if ideal else None,
    "wall_over_ideal": round(r["wall_secs"] / ideal, 4) if ideal else None,
    "429s": r["rate_limited"], "client_cpu_s": round(cpu, 2),
    "cpu_us_per_request": round(cpu * 1e6 / n, 1), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
}
print(json.dumps(row))
PY
}

{
echo "# sluice engine benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)"
if [[ $only == all || $only == unpaced ]]; then
    gen 20000 "$out/in-20000.jsonl"
    start_sim --latency-ms 0
    measure unpaced 20000 -- --concurrency 64
    stop_sim
fi
if [[ $only == all || $only == paced ]]; then
    gen 10000 "$out/in-10000.jsonl"
    start_sim --rpm 6000 --latency-ms 300
    measure paced 10000 -- --rpm 6000 --concurrency 256
    stop_sim
fi
if [[ $only == all || $only == memory ]]; then
    gen 1000000 "$out/in-1000000.jsonl"
    start_sim --latency-ms 0
    measure memory 1000000 -- --concurrency 64
    stop_sim
fi
} | tee "$out/engine.md"
