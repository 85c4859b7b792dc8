#!/usr/bin/env bash
# sluice against lm-deluge (issue 6): the same input, the same `sluice sim`, side by side.
#
#   bench/compare.sh                        # every scenario, full size, 1 repeat
#   bench/compare.sh --repeats 3 paced      # some scenarios, repeated
#   bench/compare.sh --smoke                # small sizes, a couple of minutes
#
# Scenarios (sizes and limits are environment variables, defaults in brackets):
#   unpaced  N_UNPACED [20000] requests, simulator latency 0, no limits
#   paced    N_PACED [10000] at RPM [6000], simulator enforcing RPM, latency 300 ms
#   faults   paced + --fault 500=0.05 --fault hang=0.01 --fault 429=0.02, hangs of
#            HANG_MS [15000] against a 10 s per-attempt timeout in both clients
#   scale    N_SCALE [1000000] unpaced; lm-deluge is stopped at DELUGE_SCALE_LIMIT_S [600]
#            seconds or DELUGE_RSS_LIMIT_MB [12000] of memory, whichever comes first
#   unknown  N_UNKNOWN [1000] against a simulator enforcing UNKNOWN_RPM [500] and
#            UNKNOWN_TPM [200000] (OpenAI tier 1 for gpt-4.1-mini) that neither client is
#            told: sluice runs without --rpm, lm-deluge with its default limits
# Every lm-deluge run is stopped after DELUGE_LIMIT_S [900] seconds (scale: see above) and
# the table says so. CONCURRENCY_UNPACED [64] and CONCURRENCY_PACED [256] go to both tools.
# SIM_BURST_SECONDS, when set, gives the simulator's buckets that many seconds of burst
# (its default is 1 s; a bigger burst forgives a client that starts with a full minute).
# SLUICE_BIN, when set, is the sluice binary measured (default: build this checkout).
#
# Each run: POST /_sim/reset, the client under GNU time (user+sys CPU and peak RSS of the
# client process only), then GET /_sim/stats. Repeats alternate the order (sluice, deluge |
# deluge, sluice | ...) so drift cancels in the pairwise ratios. Figures are per-run JSON in
# bench/out/compare/rows.jsonl; the table goes to stdout and bench/out/compare.md (--out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

repeats=1
full=1
table=bench/out/compare.md
scenarios=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --repeats) repeats=$2; shift 2 ;;
        --out) table=$2; full=0; shift 2 ;;
        --smoke)
            full=0
            : "${N_UNPACED:=2000}" "${N_PACED:=500}" "${N_FAULTS:=500}" "${N_SCALE:=5000}"
            : "${N_UNKNOWN:=100}" "${DELUGE_LIMIT_S:=120}" "${DELUGE_SCALE_LIMIT_S:=60}"
            shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        unpaced|paced|faults|scale|unknown) scenarios+=("$1"); shift ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(unpaced paced faults scale unknown)

: "${N_UNPACED:=20000}" "${N_PACED:=10000}" "${N_FAULTS:=10000}" "${N_SCALE:=1000000}"
: "${N_UNKNOWN:=1000}" "${RPM:=6000}" "${HANG_MS:=15000}"
: "${UNKNOWN_RPM:=500}" "${UNKNOWN_TPM:=200000}"
: "${DELUGE_LIMIT_S:=900}" "${DELUGE_SCALE_LIMIT_S:=600}" "${DELUGE_RSS_LIMIT_MB:=12000}"
: "${CONCURRENCY_UNPACED:=64}" "${CONCURRENCY_PACED:=256}"
NO_LIMIT=1000000000 # lm-deluge always paces; this many per minute never binds
[[ $N_UNPACED == 20000 && $N_PACED == 10000 && $N_FAULTS == 10000 && $N_SCALE == 1000000 &&
    $N_UNKNOWN == 1000 && $RPM == 6000 ]] || full=0

# --- tools ---------------------------------------------------------------------------
# SLUICE_BIN: a sluice binary to measure instead of building this checkout's.
if [[ -n "${SLUICE_BIN:-}" ]]; then
    bin=$(realpath "$SLUICE_BIN")
else
    cargo build --release -p sluice-cli >&2
    bin="$PWD/target/release/sluice"
fi
venv=bench/.venv
pinned=$(sed -n 's/^lm-deluge==//p' bench/requirements.txt)
installed() { "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("lm-deluge"))' 2>/dev/null; }
if [[ "$(installed)" != "$pinned" ]]; then
    echo "installing bench/requirements.txt into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r bench/requirements.txt >&2
fi
deluge_version=$(installed)

out=bench/out/compare
mkdir -p "$out"
rows="$out/rows.jsonl"
: > "$rows"

# --- simulator -----------------------------------------------------------------------
sim_pid=""
start_sim() { # start_sim FLAGS... ; sets $base (with /v1) and $root (without)
    "$bin" sim --port 0 ${SIM_BURST_SECONDS:+--burst-seconds "$SIM_BURST_SECONDS"} "$@" \
        > "$out/sim.log" 2>&1 &
    sim_pid=$!
    for _ in $(seq 100); do
        if grep -q "listening on" "$out/sim.log"; then break; fi
        sleep 0.1
    done
    base="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$out/sim.log" | head -1)"
    root="${base%/v1}"
}
stop_sim() {
    if [[ -n $sim_pid ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
    sim_pid=""
}
trap stop_sim EXIT

gen() { # gen N FILE: the same chat bodies bench/engine.sh sends
    [[ -s $2 ]] && [[ $(wc -l < "$2") -eq $1 ]] && return
    python3 bench/gen_requests.py "$1" "$2"
}

# --- one run -------------------------------------------------------------------------
# run_one TOOL SCENARIO REP N IDEAL_RPM LIMIT_S -- TOOL_ARGS...
# IDEAL_RPM is the rate the simulator enforces (0: none); LIMIT_S bounds lm-deluge's run.
run_one() {
    local tool=$1 scen=$2 rep=$3 n=$4 ideal_rpm=$5 limit=$6; shift 7
    local tag="$scen-$tool-$rep" input="$out/in-$n.jsonl"
    curl -fsS -X POST "$root/_sim/reset" > /dev/null
    echo "  $tag ..." >&2
    case $tool in
    sluice)
        /usr/bin/time -f "%U %S %M %e" -o "$out/$tag.time" \
            timeout -k 10 $((limit + 120)) \
            "$bin" run "$input" -o "$out/$tag.out.jsonl" --base-url "$base" --fresh \
            --no-progress --report "$out/$tag.report.json" "$@" \
            > /dev/null 2> "$out/$tag.stderr" || true ;;
    deluge)
        /usr/bin/time -f "%U %S %M %e" -o "$out/$tag.time" \
            timeout -k 10 $((limit + 120)) \
            "$venv/bin/python" bench/lm_deluge_driver.py "$input" --base-url "$base" \
            --output "$out/$tag.out.jsonl" --summary "$out/$tag.report.json" \
            --time-limit "$limit" --rss-limit-mb "$DELUGE_RSS_LIMIT_MB" "$@" \
            > "$out/$tag.stdout" 2> "$out/$tag.stderr" || true ;;
    esac
    curl -fsS "$root/_sim/stats" > "$out/$tag.stats.json"
    python3 bench/compare_report.py row "$out" "$tag" "$tool" "$scen" "$rep" "$n" "$ideal_rpm" >> "$rows"
}

# run_pair SCENARIO N IDEAL_RPM LIMIT_S "SLUICE_ARGS" "DELUGE_ARGS": every repeat, both
# tools, in alternating order.
run_pair() {
    local scen=$1 n=$2 ideal_rpm=$3 limit=$4 s_args=$5 d_args=$6 rep
    gen "$n" "$out/in-$n.jsonl"
    for rep in $(seq "$repeats"); do
        # shellcheck disable=SC2086 # the argument strings are word lists
        if (( rep % 2 == 1 )); then
            run_one sluice "$scen" "$rep" "$n" "$ideal_rpm" "$limit" -- $s_args
            run_one deluge "$scen" "$rep" "$n" "$ideal_rpm" "$limit" -- $d_args
        else
            run_one deluge "$scen" "$rep" "$n" "$ideal_rpm" "$limit" -- $d_args
            run_one sluice "$scen" "$rep" "$n" "$ideal_rpm" "$limit" -- $s_args
        fi
    done
}

# --- scenarios -----------------------------------------------------------------------
cu=$CONCURRENCY_UNPACED cp=$CONCURRENCY_PACED
common_s="--timeout 10s --max-attempts 6"
common_d="--timeout 10 --max-attempts 6"
for scen in "${scenarios[@]}"; do
    echo "$scen" >&2
    case $scen in
    unpaced)
        start_sim --latency-ms 0
        run_pair unpaced "$N_UNPACED" 0 "$DELUGE_LIMIT_S" \
            "$common_s --concurrency $cu" \
            "$common_d --concurrency $cu --rpm $NO_LIMIT --tpm $NO_LIMIT" ;;
    paced)
        start_sim --rpm "$RPM" --latency-ms 300
        run_pair paced "$N_PACED" "$RPM" "$DELUGE_LIMIT_S" \
            "$common_s --concurrency $cp --rpm $RPM" \
            "$common_d --concurrency $cp --rpm $RPM --tpm $NO_LIMIT" ;;
    faults)
        start_sim --rpm "$RPM" --latency-ms 300 --hang-ms "$HANG_MS" \
            --fault 500=0.05 --fault hang=0.01 --fault 429=0.02
        run_pair faults "$N_FAULTS" "$RPM" "$DELUGE_LIMIT_S" \
            "$common_s --concurrency $cp --rpm $RPM" \
            "$common_d --concurrency $cp --rpm $RPM --tpm $NO_LIMIT" ;;
    scale)
        start_sim --latency-ms 0
        run_pair scale "$N_SCALE" 0 "$DELUGE_SCALE_LIMIT_S" \
            "$common_s --concurrency $cu" \
            "$common_d --concurrency $cu --rpm $NO_LIMIT --tpm $NO_LIMIT" ;;
    unknown)
        start_sim --rpm "$UNKNOWN_RPM" --tpm "$UNKNOWN_TPM" --latency-ms 300
        run_pair unknown "$N_UNKNOWN" "$UNKNOWN_RPM" "$DELUGE_LIMIT_S" \
            "$common_s --concurrency $cu" \
            "$common_d --concurrency $cu" ;;
    esac
    stop_sim
done

mkdir -p "$(dirname "$table")"
python3 bench/compare_report.py table "$rows" \
    --header "sluice $(git rev-parse --short HEAD 2>/dev/null || echo '?') vs lm-deluge $deluge_version, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $repeats repeat(s)" \
    | tee "$table"
# A full run (every scenario at its default size) also writes the table into BENCHMARKS.md.
if [[ $full == 1 && ${#scenarios[@]} -eq 5 ]]; then
    python3 bench/compare_report.py inject "$table" BENCHMARKS.md
    echo "table written to BENCHMARKS.md" >&2
fi
