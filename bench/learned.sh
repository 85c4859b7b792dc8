#!/usr/bin/env bash
# Limits learned from headers (issue 5): sluice runs against a `sluice sim` that enforces
# limits it is not told (no --rpm / --tpm), so it paces only by what the rate-limit headers
# say. For each scenario: the share of the binding limit used once converged, the share of
# requests that got a 429, and the wall time against the ideal.
#
#   bench/learned.sh                  # every scenario
#   bench/learned.sh openai-rpm       # one (openai-rpm, openai-tpm, anthropic-otpm)
#
# Scenarios (simulator latency 300 ms, burst 1 s, completions 16-128 tokens capped by
# max_tokens 64):
#   openai-rpm      N_RPM [1500] requests, gpt-4.1-mini, --rpm 600 --tpm 10000000
#   openai-tpm      N_TPM [1500] requests, gpt-4.1-mini, --rpm 10000 --tpm 60000
#                   (charged prompt + max_tokens, refunded to the real usage)
#   anthropic-otpm  N_OTPM [1500] requests, claude-haiku-4-5, --rpm 10000 --itpm 1000000
#                   --otpm 40000 (charged max_tokens, refunded to the real output)
# While a run goes, /_sim/stats is read every 0.25 s. "Converged" is the middle of the run:
# from 40% to 90% of its wall time (the start is slow start and learning, the end a tail
# of too few requests to fill the limit). Use of the limit = what the binding resource
# (requests, prompt+completion tokens, completion tokens) grew by in that window, over
# what the limit allows in it. Results go to stdout and bench/out/learned.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p sluice-cli >&2
bin="$PWD/target/release/sluice"
out=bench/out/learned
mkdir -p "$out"
: "${N_RPM:=1500}" "${N_TPM:=1500}" "${N_OTPM:=1500}"
scenarios=("$@")
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(openai-rpm openai-tpm anthropic-otpm)

gen() { # gen N MODEL FILE
    python3 bench/gen_requests.py "$1" "$3" "$2"
}

sim_pid=""
stop_sim() {
    [[ -n $sim_pid ]] && { kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; }
    sim_pid=""
}
trap stop_sim EXIT

report=bench/out/learned.md
{
    echo "# sluice learned limits, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), $(nproc) cores"
    echo
    echo "| scenario | limits (not told) | requests | wall s | ideal s | wall/ideal | converged use of the binding limit | 429s | 429s / requests | failed |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
} > "$report"

for scen in "${scenarios[@]}"; do
    case $scen in
    openai-rpm) n=$N_RPM model=gpt-4.1-mini limits="--rpm 600 --tpm 10000000" bind=requests rate=600 ;;
    openai-tpm) n=$N_TPM model=gpt-4.1-mini limits="--rpm 10000 --tpm 60000" bind=tokens rate=60000 ;;
    anthropic-otpm) n=$N_OTPM model=claude-haiku-4-5 limits="--rpm 10000 --itpm 1000000 --otpm 40000" bind=completion_tokens rate=40000 ;;
    *) echo "unknown scenario $scen" >&2; exit 2 ;;
    esac
    echo "$scen ..." >&2
    # shellcheck disable=SC2086 # a word list
    "$bin" sim --port 0 --latency-ms 300 $limits > "$out/$scen.sim.log" 2>&1 &
    sim_pid=$!
    for _ in $(seq 100); do
        grep -q "listening on" "$out/$scen.sim.log" && break
        sleep 0.1
    done
    base="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$out/$scen.sim.log" | head -1)"
    root="${base%/v1}"
    cat > "$out/models.toml" <<EOF
[providers.openai]
api_base = "$base"
[providers.anthropic]
api_base = "$base"
EOF
    gen "$n" "$model" "$out/$scen.in.jsonl"
    python3 - "$root" "$out/$scen.samples" <<'PY' &
import json, sys, time, urllib.request
root, path = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
with open(path, "w") as f:
    while True:
        try:
            s = json.load(urllib.request.urlopen(root + "/_sim/stats", timeout=5))
        except Exception:
            break
        f.write(json.dumps({"t": time.monotonic() - t0, **s}) + "\n")
        f.flush()
        time.sleep(0.25)
PY
    poller=$!
    start=$(date +%s.%N)
    OPENAI_API_KEY=sim ANTHROPIC_API_KEY=sim "$bin" run "$out/$scen.in.jsonl" \
        -o "$out/$scen.out.jsonl" --fresh --no-progress --model-config "$out/models.toml" \
        --report "$out/$scen.report.json" 2> "$out/$scen.stderr" || true
    end=$(date +%s.%N)
    sleep 0.5
    curl -fsS "$root/_sim/stats" > "$out/$scen.stats.json"
    stop_sim
    wait "$poller" 2>/dev/null || true
    python3 - "$scen" "$limits" "$n" "$bind" "$rate" "$start" "$end" "$out" <<'PY' | tee -a "$report"
import json, sys
scen, limits, n, bind, rate, start, end, out = sys.argv[1:]
n, rate, wall = int(n), float(rate), float(end) - float(start)
stats = json.load(open(f"{out}/{scen}.stats.json"))
samples = [json.loads(l) for l in open(f"{out}/{scen}.samples")]
def used(s):
    if bind == "requests":
        return s["ok"]
    if bind == "tokens":
        return s["prompt_tokens"] + s["completion_tokens"]
    return s["completion_tokens"]
# The run's own time axis: from the first sample that saw a request to the last sample.
active = [s for s in samples if s["requests"] > 0]
t_start, t_end = active[0]["t"], active[-1]["t"]
span = t_end - t_start
lo = min(active, key=lambda s: abs(s["t"] - (t_start + 0.4 * span)))
hi = min(active, key=lambda s: abs(s["t"] - (t_start + 0.9 * span)))
window = hi["t"] - lo["t"]
use = (used(hi) - used(lo)) / (rate / 60 * window)
total = used(stats)
ideal = total / rate * 60
failed = sum(1 for l in open(f"{out}/{scen}.out.jsonl") if '"status":"failed"' in l)
lines = sum(1 for _ in open(f"{out}/{scen}.out.jsonl"))
assert lines == n, f"{lines} outcomes for {n} requests"
print(f"| {scen} | `{limits}` | {n} | {wall:.1f} | {ideal:.1f} | {wall / ideal:.3f} | "
      f"{100 * use:.1f}% ({window:.0f} s window) | {stats['rate_limited']} | "
      f"{100 * stats['rate_limited'] / n:.2f}% | {failed} |")
PY
done
echo >> "$report"
