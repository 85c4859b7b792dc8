#!/usr/bin/env bash
# What durability costs (issue 4):
#   1. overhead: unpaced N_OVERHEAD [20000] requests, simulator latency 0, journal on
#      (--fresh), journal and an empty --cache, and --no-journal, PAIRS [5] rounds, each in
#      a shuffled order;
#      client CPU µs/request (user+sys of the client process, from wait4) and peak RSS,
#      medians, and the median of each round's own ratios.
#   2. paced:    N_PACED [10000] requests at 6,000 RPM (simulator latency 300 ms), --no-journal
#      then the journal, PAIRS_PACED [1] pairs: client CPU and wall time.
#   3. resume:   a N_RESUME [1000000]-request run killed (-9) once RESUME_DONE [999000]
#      outcomes are in the journal, then resumed: seconds from starting the resume to the
#      first request reaching the simulator, and to the end.
#   4. instructions (not part of "all"; needs valgrind): the client's user-space
#      instructions (callgrind) in each mode at N_INSTR_SMALL [1000] and N_INSTR [5000]
#      requests, and per request at the margin (the difference over the requests between,
#      which leaves start-up out). Steady whatever the machine's load, unlike the clock, but
#      blind to the kernel's share of the CPU (about two fifths of it in these runs).
# Results go to stdout and bench/out/journal.md.
#
#   bench/journal.sh              # the first three
#   bench/journal.sh paced        # one (overhead, paced, resume, instructions)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p sluice-cli >&2
bin="$PWD/target/release/sluice"
out=bench/out/journal
mkdir -p "$out"
only="${1:-all}"
: "${N_OVERHEAD:=20000}" "${PAIRS:=5}" "${N_RESUME:=1000000}" "${RESUME_DONE:=999000}"
: "${N_PACED:=10000}" "${PAIRS_PACED:=1}" "${N_INSTR_SMALL:=1000}" "${N_INSTR:=5000}"

gen() { # gen N FILE
    [[ -f $2 ]] && return
    python3 bench/gen_requests.py "$1" "$2"
}

# cpu_of FILE CMD...: runs CMD (its output discarded) and writes its user and system CPU
# seconds, to the microsecond, and peak RSS in KiB to FILE. GNU time prints hundredths of
# a second, 2% of a 20,000-request run.
cpu_of() {
    python3 - "$@" <<'PY'
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_utime:.6f} {ru.ru_stime:.6f} {ru.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
PY
}

sim_pid=""
start_sim() {
    "$bin" sim --port 0 "$@" > "$out/sim.log" 2>&1 &
    sim_pid=$!
    for _ in $(seq 100); do
        if grep -q "listening on" "$out/sim.log"; then break; fi
        sleep 0.1
    done
    base="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$out/sim.log" | head -1)"
    root="${base%/v1}"
}
stop_sim() { kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; }
trap stop_sim EXIT
sim_requests() { curl -s "$root/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }

report="$out/../journal.md"
{
echo "# sluice journal benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD), $(nproc) cores"
echo
} > "$report"

if [[ $only == all || $only == overhead ]]; then
    gen "$N_OVERHEAD" "$out/in-$N_OVERHEAD.jsonl"
    start_sim
    : > "$out/overhead.rows"
    # Each round in an order shuffled afresh (seeded): a run's cost depends on the run
    # before it, whose files it deletes (see bench/ab.py).
    mapfile -t orders < <(python3 -c 'import random, sys
r = random.Random(1)
for _ in range(int(sys.argv[1])):
    m = ["journal", "none", "cache"]
    r.shuffle(m)
    print(*m)' "$PAIRS")
    for i in $(seq "$PAIRS"); do
        for mode in ${orders[$((i - 1))]}; do
            # Every run starts from nothing: an output file truncated by the next run is
            # written back by ext4 when closed, which is noise on the client's CPU.
            rm -f "$out/cache.sqlite"* "$out/overhead.out.jsonl"*
            flags=(--fresh)
            [[ $mode == none ]] && flags=(--no-journal --fresh)
            [[ $mode == cache ]] && flags=(--fresh --cache "$out/cache.sqlite")
            cpu_of "$out/t" "$bin" run "$out/in-$N_OVERHEAD.jsonl" \
                -o "$out/overhead.out.jsonl" --base-url "$base" --no-progress "${flags[@]}"
            echo "$mode $(cat "$out/t")" >> "$out/overhead.rows"
        done
    done
    stop_sim
    python3 - "$out/overhead.rows" "$N_OVERHEAD" <<'PY' | tee -a "$report"
import statistics, sys
rows, n = sys.argv[1], int(sys.argv[2])
modes = ("none", "journal", "cache")
by = {m: [] for m in modes}
rss = {m: [] for m in modes}
for line in open(rows):
    mode, u, s, m = line.split()
    by[mode].append((float(u) + float(s)) * 1e6 / n)
    rss[mode].append(int(m) / 1024)
med = {m: statistics.median(by[m]) for m in modes if by[m]}
b = med["none"]
print(f"## Overhead: {n} unpaced requests, {len(by['none'])} rounds, each in a shuffled order (medians)\n")
print("| | CPU µs/request | against --no-journal | peak RSS MB |\n|---|---|---|---|")
label = {"none": "--no-journal", "journal": "journal (default)",
         "cache": "journal + --cache (empty cache: every request a miss, then stored)"}
for m in modes:
    if m in med:
        d = med[m] - b
        print(f"| {label[m]} | {med[m]:.1f} | {d:+.1f} ({100 * d / b:+.1f}%) | "
              f"{statistics.median(rss[m]):.1f} |")
print()
# Each round ran the three in turn, so a round's ratios share its moment of the machine:
# their median is steadier than the ratio of the medians when the VM's speed drifts.
rounds = min(len(by[m]) for m in modes)
def paired(a, b):
    return statistics.median(by[a][i] / by[b][i] for i in range(rounds))
if rounds:
    print(f"paired (median of the {rounds} rounds' own ratios): journal against --no-journal "
          f"{100 * (paired('journal', 'none') - 1):+.1f}%, cache against the journal alone "
          f"{100 * (paired('cache', 'journal') - 1):+.1f}%, journal and cache together "
          f"against --no-journal {100 * (paired('cache', 'none') - 1):+.1f}%\n")
print("all runs (µs/request): " + "; ".join(
    m + " " + ", ".join(f"{x:.1f}" for x in by[m]) for m in modes) + "\n")
PY
fi

if [[ $only == instructions ]]; then
    command -v valgrind > /dev/null || { echo "instructions: valgrind is not installed" >&2; exit 1; }
    start_sim
    : > "$out/instr.rows"
    for n in "$N_INSTR_SMALL" "$N_INSTR"; do
        gen "$n" "$out/in-$n.jsonl"
        for mode in none journal cache; do
            rm -f "$out/cache.sqlite"* "$out/instr.out.jsonl"*
            flags=(--fresh)
            [[ $mode == none ]] && flags=(--no-journal --fresh)
            [[ $mode == cache ]] && flags=(--fresh --cache "$out/cache.sqlite")
            valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
                "$bin" run "$out/in-$n.jsonl" -o "$out/instr.out.jsonl" --base-url "$base" \
                --no-progress "${flags[@]}" > /dev/null 2> "$out/valgrind.err"
            echo "$mode $n $(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/valgrind.err")" \
                >> "$out/instr.rows"
        done
    done
    rm -f "$out/callgrind.out"
    stop_sim
    python3 - "$out/instr.rows" <<'PY' | tee -a "$report"
import sys
rows = [line.split() for line in open(sys.argv[1])]
got = {(m, int(n)): int(i) for m, n, i in rows}
small, large = sorted({n for _, n in got})
at = {m: (got[m, large] - got[m, small]) / (large - small) for m in ("none", "journal", "cache")}
print(f"## Instructions (callgrind, client only, {small:,} and {large:,} requests)\n")
print(f"| mode | at {small:,} | at {large:,} | per request at the margin |")
print("|---|---|---|---|")
for m, label in (("none", "`--no-journal`"), ("journal", "journal"),
                 ("cache", "journal + `--cache`, every request a miss")):
    print(f"| {label} | {got[m, small] / 1e6:.1f}M | {got[m, large] / 1e6:.1f}M | {at[m]:,.0f} |")
print()
pct = lambda a, b: f"{100 * (at[a] / at[b] - 1):+.1f}%"
print(f"at the margin: journal against --no-journal {pct('journal', 'none')}, cache against "
      f"the journal alone {pct('cache', 'journal')}, journal and cache together against "
      f"--no-journal {pct('cache', 'none')}\n")
PY
fi

if [[ $only == all || $only == paced ]]; then
    # The paced benchmark (as bench/engine.sh paced): --no-journal, then the journal.
    gen "$N_PACED" "$out/in-$N_PACED.jsonl"
    start_sim --rpm 6000 --latency-ms 300
    : > "$out/paced.rows"
    for i in $(seq "$PAIRS_PACED"); do
        for mode in none journal; do
            flags=(--fresh); [[ $mode == none ]] && flags=(--no-journal --fresh)
            curl -s -X POST "$root/_sim/reset" > /dev/null
            /usr/bin/time -f "%U %S %M %e" -o "$out/t" "$bin" run "$out/in-$N_PACED.jsonl" \
                -o "$out/paced.out.jsonl" --base-url "$base" --no-progress --rpm 6000 \
                --concurrency 256 --timeout 10s "${flags[@]}" 2>/dev/null
            echo "$mode $(cat "$out/t")" >> "$out/paced.rows"
        done
    done
    stop_sim
    python3 - "$out/paced.rows" "$N_PACED" <<'PY' | tee -a "$report"
import sys
rows, n = sys.argv[1], int(sys.argv[2])
print(f"## Paced: {n} requests at 6,000 RPM, latency 300 ms\n")
print("| pair | --no-journal CPU s | journal CPU s | journal cost | wall s (none / journal) |")
print("|---|---|---|---|---|")
runs = [l.split() for l in open(rows)]
for i in range(0, len(runs) - 1, 2):
    (_, u0, s0, _, e0), (_, u1, s1, _, e1) = runs[i], runs[i + 1]
    a, b = float(u0) + float(s0), float(u1) + float(s1)
    print(f"| {i // 2 + 1} | {a:.2f} | {b:.2f} | {b - a:+.2f} ({100 * (b - a) / a:+.0f}%) | {e0} / {e1} |")
print()
PY
fi

if [[ $only == all || $only == resume ]]; then
    gen "$N_RESUME" "$out/in-$N_RESUME.jsonl"
    start_sim
    o="$out/resume.out.jsonl"
    rm -f "$o" "$o.journal" "$o.journal-wal" "$o.journal-shm" "$o.journal-log"
    "$bin" run "$out/in-$N_RESUME.jsonl" -o "$o" --base-url "$base" --no-progress 2>/dev/null
    sizes="journal $(stat -c %s "$o.journal") bytes for an output of $(stat -c %s "$o") bytes"
    # The state a crash leaves when RESUME_DONE outcomes were committed: the journal's
    # later rows and their output lines gone. (Killing the client at exactly that moment
    # cannot be timed: the last thousand requests take 30 ms.)
    python3 - "$o" "$RESUME_DONE" <<'PY'
import sqlite3, sys
out, keep = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(out + ".journal")
# Whole commits (segments) go, as in a crash: keep those ending at or before `keep`.
db.execute("DELETE FROM segments WHERE first_seq + count - 1 > ?", (keep,))
keep = db.execute("SELECT COALESCE(MAX(first_seq + count - 1), 0) FROM segments").fetchone()[0]
db.commit()
db.close()
with open(out, "rb+") as f:
    n, pos = 0, 0
    for line in f:
        n += 1
        pos += len(line)
        if n == keep:
            break
    f.truncate(pos)
PY
    # (status exits 3 while requests are pending)
    done_before=$({ "$bin" status "$o.journal" --json || true; } | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["done"])')
    before=$(sim_requests)
    t0=$(date +%s.%N)
    "$bin" run "$out/in-$N_RESUME.jsonl" -o "$o" --base-url "$base" --no-progress 2> "$out/resume.stderr" &
    pid=$!
    first=""
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -z $first && $(sim_requests) -gt $before ]]; then first=$(date +%s.%N); fi
        [[ -n $first ]] && break
        sleep 0.01
    done
    wait "$pid"
    t_end=$(date +%s.%N)
    lines=$(wc -l < "$o")
    stop_sim
    python3 - "$t0" "${first:-}" "$t_end" "$done_before" "$N_RESUME" "$lines" "$sizes" <<'PY' | tee -a "$report"
import sys
t0, first, end, done, n, lines, sizes = sys.argv[1:]
t0, end = float(t0), float(end)
start = f"{float(first) - t0:.2f}" if first else "never (nothing left to send)"
print(f"## Resume: {int(n):,} requests, {int(done):,} done at the kill\n")
print(f"- first request reached the simulator {start} s after the resume started")
print(f"- the resume finished in {end - t0:.2f} s; the output has {int(lines):,} lines")
print(f"- the whole run's {sizes}\n")
PY
fi
