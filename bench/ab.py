#!/usr/bin/env python3
"""A/B rounds of builds and modes: the client CPU of each, paired round by round.

    bench/ab.py N ROUNDS LABEL=BINARY[:FLAGS] ... [--pair A/B ...] [--seed S | --in-order]

Each round runs every LABEL once, in an order shuffled afresh each round (seeded by S,
default 1; --in-order keeps the order given), against one simulator (started from
the first BINARY, port 0, latency 0): `BINARY run` of N requests shaped like the engine
benchmark's (generated once into bench/out/ab/), unpaced, `--fresh`, with FLAGS. In FLAGS,
CACHE stands for a cache file emptied before each run. The client's CPU (user + system)
comes from wait4, to the microsecond.

Two builds measured in the same rounds see the same machine: on this VM the speed moves
more from minute to minute than most changes do, so a build is compared with another
through the ratios of its runs to theirs in each round, and the medians of those ratios.
The order is shuffled because a run's cost depends on the run before it (each deletes the
last one's files, up to 50 MB of the kernel's pages): in a fixed order, two builds of the
same code differed by 3% in their modes' ratios, by their places in the round alone.

It prints each LABEL's median µs a request (user and system apart), then each `--pair A/B`
(by default each LABEL against the first): the median and mean of B's ratio to A in each
round, and the median difference in µs a request. Each run's figures are in
bench/out/ab/ab.res (label, CPU seconds, user, system, peak RSS in KiB), one line a run.

Example: the journal and the cache against --no-journal, for two builds:

    bench/ab.py 20000 30 N0=old:--no-journal J0=old: C0=old:'--cache CACHE' \\
        N1=new:--no-journal J1=new: C1=new:'--cache CACHE' \\
        --pair N0/J0 --pair J0/C0 --pair N0/C0 --pair N1/J1 --pair J1/C1 --pair N1/C1 \\
        --pair C0/C1
"""

import glob
import os
import random
import re
import shlex
import statistics as st
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_requests import generate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out", "ab")


def usage(msg):
    sys.exit(f"bench/ab.py: {msg}\n\n{__doc__}")


def main():
    args = sys.argv[1:]
    pairs = []
    seed, in_order = 1, False
    if "--in-order" in args:
        args.remove("--in-order")
        in_order = True
    if "--seed" in args:
        i = args.index("--seed")
        try:
            seed = int(args[i + 1])
        except (IndexError, ValueError):
            usage("--seed takes a number")
        del args[i : i + 2]
    while "--pair" in args:
        i = args.index("--pair")
        if i + 1 >= len(args) or "/" not in args[i + 1]:
            usage("--pair takes A/B")
        pairs.append(tuple(args[i + 1].split("/", 1)))
        del args[i : i + 2]
    if len(args) < 3:
        usage("N, ROUNDS and at least one LABEL=BINARY[:FLAGS]")
    try:
        n, rounds = int(args[0]), int(args[1])
    except ValueError:
        usage("N and ROUNDS are numbers")
    configs = []
    for a in args[2:]:
        label, eq, rest = a.partition("=")
        if not eq or not label:
            usage(f"{a!r} is not LABEL=BINARY[:FLAGS]")
        binary, _, flags = rest.partition(":")
        if not os.access(binary, os.X_OK):
            usage(f"{binary!r} is not an executable")
        configs.append((label, os.path.abspath(binary), shlex.split(flags)))
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        usage("each LABEL once")
    for a, b in pairs:
        if a not in labels or b not in labels:
            usage(f"--pair {a}/{b}: no such LABEL")
    pairs = pairs or [(labels[0], l) for l in labels[1:]]

    os.makedirs(OUT, exist_ok=True)
    inp = os.path.join(OUT, f"in{n}.jsonl")
    if not os.path.exists(inp):
        generate(n, inp)
    out = os.path.join(OUT, "out.jsonl")
    cache = os.path.join(OUT, "cache.db")
    log_path = os.path.join(OUT, "sim.log")
    with open(log_path, "w") as log:
        sim = subprocess.Popen(
            [configs[0][1], "sim", "--port", "0", "--latency-ms", "0"], stdout=log, stderr=log
        )
    try:
        base = None
        for _ in range(200):
            m = re.search(r"listening on (http\S+)", open(log_path).read())
            if m:
                base = m.group(1)
                break
            time.sleep(0.05)
        if base is None:
            sys.exit("bench/ab.py: the simulator did not start (see bench/out/ab/sim.log)")
        cpu = {l: [] for l in labels}
        parts = {l: [] for l in labels}
        rng = random.Random(seed)
        with open(os.path.join(OUT, "ab.res"), "w") as res:
            for r in range(rounds):
                order = list(configs)
                if not in_order:
                    rng.shuffle(order)
                for label, binary, flags in order:
                    for f in glob.glob(out + "*") + glob.glob(cache + "*"):
                        os.remove(f)
                    cmd = [binary, "run", inp, "-o", out, "--base-url", base, "--fresh",
                           "--no-progress"] + [cache if x == "CACHE" else x for x in flags]
                    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    _, status, ru = os.wait4(p.pid, 0)
                    if status != 0:
                        sys.exit(f"bench/ab.py: {label} exited {status} in round {r + 1}: "
                                 + " ".join(map(shlex.quote, cmd)))
                    cpu[label].append(ru.ru_utime + ru.ru_stime)
                    parts[label].append((ru.ru_utime, ru.ru_stime))
                    res.write(f"{label} {ru.ru_utime + ru.ru_stime:.6f} {ru.ru_utime:.6f} "
                              f"{ru.ru_stime:.6f} {ru.ru_maxrss}\n")
                    res.flush()
                print(f"round {r + 1} of {rounds}", file=sys.stderr)
    finally:
        sim.kill()
        sim.wait()

    us = 1e6 / n
    print(f"{rounds} rounds of {n:,} requests; client CPU, µs a request (median)")
    for l in labels:
        u = st.median(x for x, _ in parts[l]) * us
        s = st.median(y for _, y in parts[l]) * us
        print(f"  {l}: {st.median(cpu[l]) * us:.2f} (user {u:.2f}, system {s:.2f})")
    print("paired, B against A in each round:")
    for a, b in pairs:
        ratios = [y / x for x, y in zip(cpu[a], cpu[b])]
        diffs = [(y - x) * us for x, y in zip(cpu[a], cpu[b])]
        print(f"  {b} over {a}: median {(st.median(ratios) - 1) * 100:+.1f}%, "
              f"mean {(st.mean(ratios) - 1) * 100:+.1f}%, "
              f"median difference {st.median(diffs):+.2f} µs a request")


if __name__ == "__main__":
    main()
