"""Figures and table for bench/compare.sh (sluice against lm-deluge).

    compare_report.py row OUT TAG TOOL SCENARIO REP N IDEAL_RPM   -> one JSON line
    compare_report.py table ROWS.jsonl [--header TEXT]           -> markdown table

`row` reads what one run left in OUT: TAG.time (GNU time "%U %S %M %e"), TAG.report.json
(sluice's --report, or the lm-deluge driver's summary), TAG.out.jsonl (the outcomes) and
TAG.stats.json (the simulator's /_sim/stats after the run).
"""

import argparse
import os
import json
import statistics
import sys

NOTES = {
    ("unknown", "sluice"): "not told the limits: paces by the limits its headers announce",
    ("unknown", "deluge"): "not told the limits: lm-deluge's defaults",
}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_time(path):
    """(user+sys CPU s, peak RSS MB, elapsed s) from GNU time's file.

    GNU time writes "Command exited with non-zero status N" first when the client fails;
    the figures are on the last line.
    """
    with open(path) as f:
        last = f.read().strip().splitlines()[-1]
    u, s, rss_kb, elapsed = last.split()
    return float(u) + float(s), int(rss_kb) / 1024, float(elapsed)


def count_outcomes(path):
    """(lines, distinct custom_ids) of an outcome file."""
    lines, ids = 0, set()
    try:
        with open(path) as f:
            for line in f:
                lines += 1
                ids.add(json.loads(line).get("custom_id"))
    except OSError:
        pass
    return lines, len(ids)


def row(out, tag, tool, scenario, rep, n, ideal_rpm):
    p = f"{out}/{tag}"
    cpu, rss_mb, elapsed = read_time(f"{p}.time")
    rep_json = load_json(f"{p}.report.json") or {}
    stats = load_json(f"{p}.stats.json") or {}
    lines, distinct = count_outcomes(f"{p}.out.jsonl")
    succeeded = rep_json.get("succeeded", 0)
    failed = rep_json.get("failed", 0)
    finished = bool(rep_json) and rep_json.get("finished", True) and not rep_json.get("stopped")
    if tool == "sluice":
        kinds = {k: v["count"] for k, v in (rep_json.get("failures") or {}).items()}
        client_429s = rep_json.get("rate_limited")
        stopped = rep_json.get("stopped") if rep_json else "no report (crashed or killed)"
    else:
        kinds = {
            ("HTTP " + k if k != "None" else "no HTTP status"): v
            for k, v in (rep_json.get("failures_by_status") or {}).items()
        }
        client_429s = rep_json.get("rate_limit_errors")
        stopped = rep_json.get("stopped") if rep_json else "no summary (crashed or killed)"
    done = succeeded + failed
    ideal = n / (ideal_rpm / 60) if ideal_rpm else None
    return {
        "scenario": scenario,
        "tool": tool,
        "rep": rep,
        "requests": n,
        "finished": finished,
        "stopped": stopped,
        "done": done,
        "succeeded": succeeded,
        "failed": failed,
        "failure_kinds": kinds,
        # Lost: no outcome line. A run stopped by the harness's bound counts what it had not
        # finished (lm-deluge writes nothing before the end, so its file is empty then).
        "lost": n - distinct if finished else n - done,
        "duplicate_outcomes": lines - distinct,
        "wall_s": elapsed,
        "wall_in_process_s": rep_json.get("wall_secs"),
        "ideal_s": ideal,
        "wall_over_ideal": elapsed / ideal if ideal else None,
        "sim_429s": stats.get("rate_limited"),
        "sim_injected_429s": (stats.get("injected_faults") or {}).get("429"),
        "client_429s": client_429s,
        "ok_duplicates": stats.get("ok_duplicates"),
        "sim_requests": stats.get("requests"),
        "cpu_s": cpu,
        "cpu_us_per_request": cpu * 1e6 / done if done else None,
        "peak_rss_mb": rss_mb,
        "cooldowns": rep_json.get("cooldowns"),
    }


# --- table ---------------------------------------------------------------------------

COLUMNS = [  # (heading, row key, format, lower bound when lm-deluge did not finish?)
    ("wall s", "wall_s", "{:.2f}", True),
    ("ideal s", "ideal_s", "{:.1f}", None),
    ("wall/ideal", "wall_over_ideal", "{:.3f}", True),
    ("429s", "sim_429s", "{:.0f}", True),
    ("failed", "failed", "{:.0f}", None),
    ("lost", "lost", "{:.0f}", None),
    ("dup 200s", "ok_duplicates", "{:.0f}", True),
    ("CPU s", "cpu_s", "{:.2f}", True),
    ("CPU µs/req", "cpu_us_per_request", "{:.0f}", None),
    ("peak RSS MB", "peak_rss_mb", "{:.1f}", True),
]
TOOL_NAME = {"sluice": "sluice", "deluge": "lm-deluge"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec):
    return "–" if value is None else spec.format(value)


def ratio(s, d):
    """sluice / lm-deluge of one figure, as text."""
    if s is None or d is None:
        return "–"
    if d == 0:
        return "both 0" if s == 0 else "∞"
    r = s / d
    return f"{r:.3f}" if r < 10 else f"{r:.1f}"


def table(rows_path, header):
    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    heading = ["scenario", "tool", "requests"] + [c[0] for c in COLUMNS] + ["note"]
    out = [f"# {header}", "", "| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    for scen in scenarios:
        by_tool = {t: [r for r in rows if r["scenario"] == scen and r["tool"] == t] for t in TOOL_NAME}
        for tool, runs in by_tool.items():
            if not runs:
                continue
            cells = [scen, TOOL_NAME[tool], str(runs[0]["requests"])]
            unfinished = [r for r in runs if not r["finished"]]
            for _, key, spec, _ in COLUMNS:
                text = fmt(median(r[key] for r in runs), spec)
                if unfinished and key in ("wall_s", "wall_over_ideal") and text != "–":
                    text = "≥" + text
                cells.append(text)
            notes = [NOTES.get((scen, tool), "")]
            for r in runs:
                if r["failure_kinds"]:
                    kinds = ", ".join(f"{v} {k}" for k, v in sorted(r["failure_kinds"].items()))
                    notes.append(f"run {r['rep']} failed: {kinds}")
            for r in unfinished:
                notes.append(f"run {r['rep']} did not finish: {r['stopped']}, {r['done']}/{r['requests']} done")
            cells.append("; ".join(x for x in notes if x))
            out.append("| " + " | ".join(cells) + " |")
        # Ratios pair by pair (same repeat), then the median over the pairs.
        pairs = [
            (s, d)
            for s in by_tool["sluice"]
            for d in by_tool["deluge"]
            if s["rep"] == d["rep"]
        ]
        if pairs:
            cells = [scen, "**sluice / lm-deluge**", ""]
            partial = any(not d["finished"] for _, d in pairs)
            for _, key, _, bound in COLUMNS:
                if key == "ideal_s":
                    cells.append("")
                    continue
                texts = [ratio(s[key], d[key]) for s, d in pairs]
                nums = [float(t) for t in texts if t.replace(".", "", 1).isdigit()]
                text = f"{statistics.median(nums):.3g}" if len(nums) == len(texts) else texts[0]
                if partial and bound and nums and statistics.median(nums) != 0:
                    text = "≤" + text
                cells.append(f"**{text}**")
            cells.append(
                f"median of {len(pairs)} pair(s)"
                + ("; lm-deluge stopped early, ≤ marks bounds" if partial else "")
            )
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "wall s: elapsed time of the client process (GNU time), start-up and imports included.",
        "ideal s: requests / (the simulator's RPM / 60) when the simulator enforces a rate.",
        "429s: rate-limit 429s the simulator sent (`rate_limited` in /_sim/stats; injected 429",
        "faults not included). failed: requests whose outcome is a failure. lost: requests with",
        "no outcome line (for a run stopped at its bound: not done by then). dup 200s:",
        "`ok_duplicates`, successful responses paid twice.",
        "CPU: user+sys of the client process alone; µs/req divides by the requests done.",
        "Figures are the median over repeats; ratios are taken within each repeat's pair, then",
        "their median (repeats alternate which tool runs first). Per-run figures:",
        "bench/out/compare/rows.jsonl.",
    ]
    return "\n".join(out)


BEGIN = "<!-- compare.sh table: begin -->"
END = "<!-- compare.sh table: end -->"


def inject(table_path, doc_path):
    """Puts the table between the markers of doc_path (BENCHMARKS.md)."""
    with open(table_path) as f:
        table_text = f.read().strip()
    # The table's own title becomes a line of the section it goes into.
    if table_text.startswith("# "):
        title, _, body = table_text.partition("\n")
        table_text = f"Run: {title[2:]}.\n{body}"
    with open(doc_path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{doc_path} has no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc_path + ".tmp", "w") as f:
        f.write(f"{head}{BEGIN}\n{table_text}\n{END}{tail}")
    os.replace(doc_path + ".tmp", doc_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("row")
    for name in ("out", "tag", "tool", "scenario"):
        r.add_argument(name)
    r.add_argument("rep", type=int)
    r.add_argument("n", type=int)
    r.add_argument("ideal_rpm", type=int)
    t = sub.add_parser("table")
    t.add_argument("rows")
    t.add_argument("--header", default="sluice vs lm-deluge")
    i = sub.add_parser("inject")
    i.add_argument("table")
    i.add_argument("doc")
    a = ap.parse_args()
    if a.cmd == "row":
        print(json.dumps(row(a.out, a.tag, a.tool, a.scenario, a.rep, a.n, a.ideal_rpm)))
    elif a.cmd == "inject":
        inject(a.table, a.doc)
    else:
        print(table(a.rows, a.header))


if __name__ == "__main__":
    sys.exit(main())
