"""Send a sluice input JSONL through lm-deluge, the way a user of its Python API would.

Used by bench/compare.sh so that lm-deluge and `sluice run` get the same prompts against the
same `sluice sim`. Reads chat-body lines ({"custom_id", "model", "messages", "max_tokens"}),
registers the simulator as an OpenAI-compatible model, runs every prompt through
`LLMClient.process_prompts_async`, writes one JSON line per result to --output and a
summary (counts, wall time, attempts, 429s seen) to --summary.

A watchdog stops the run early (the summary then says why and how many were done) when
--time-limit seconds have passed or the process's resident memory passes --rss-limit-mb:
lm-deluge builds every task up front, so a million prompts may not fit or finish.
"""

import argparse
import asyncio
import json
import os
import sys
import threading
import time

T0 = time.monotonic()  # before the imports: they are part of what a user waits for

from lm_deluge import Conversation, LLMClient  # noqa: E402
from lm_deluge.models import register_model  # noqa: E402

T_IMPORTED = time.monotonic()
CPU_IMPORTED = time.process_time()

MODEL_ID = "sluice-sim"
KEY_ENV = "SLUICE_BENCH_API_KEY"  # the simulator needs no key; lm-deluge wants one set


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input")
    p.add_argument("--output", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--base-url", required=True, help="the simulator's base URL, with /v1")
    p.add_argument("--rpm", type=int, help="max_requests_per_minute (default: lm-deluge's)")
    p.add_argument("--tpm", type=int, help="max_tokens_per_minute (default: lm-deluge's)")
    p.add_argument("--concurrency", type=int, help="max_concurrent_requests")
    p.add_argument("--max-attempts", type=int, help="max_attempts")
    p.add_argument("--timeout", type=int, help="request_timeout, seconds per attempt")
    p.add_argument("--time-limit", type=float, default=0, help="stop after S seconds (0: none)")
    p.add_argument("--rss-limit-mb", type=float, default=0, help="stop above this RSS (0: none)")
    return p.parse_args()


def read_prompts(path):
    """Return (custom_ids, conversations, max_tokens) from a file of chat-body lines."""
    ids, convs, max_tokens = [], [], set()
    with open(path) as f:
        for line in f:
            req = json.loads(line)
            (msg,) = req["messages"]  # the benchmark input has one user message per line
            assert msg["role"] == "user"
            ids.append(req["custom_id"])
            convs.append(Conversation().user(msg["content"]))
            max_tokens.add(req.get("max_tokens"))
    assert len(max_tokens) == 1, "lm-deluge sets max_new_tokens per client, not per prompt"
    return ids, convs, max_tokens.pop()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_summary(path, summary):
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def start_watchdog(args, summary, get_tracker):
    """Stop the process (exit 3) past --time-limit or --rss-limit-mb, after writing a summary.

    A thread, not a task: the event loop is busy for a long time while lm-deluge creates a
    task for every prompt, and the limits must hold then too.
    """
    if not args.time_limit and not args.rss_limit_mb:
        return

    def watch():
        while True:
            time.sleep(0.5)
            if args.time_limit and time.monotonic() - T0 > args.time_limit:
                stopped = f"time limit {args.time_limit:g} s"
            elif args.rss_limit_mb and rss_mb() > args.rss_limit_mb:
                stopped = f"memory limit {args.rss_limit_mb:g} MB"
            else:
                continue
            tracker = get_tracker()
            summary.update(
                finished=False,
                stopped=stopped,
                succeeded=tracker.num_tasks_succeeded if tracker else 0,
                failed=tracker.num_tasks_failed if tracker else 0,
                output_lines=0,
                attempts=tracker.total_requests if tracker else 0,
                rate_limit_errors=tracker.num_rate_limit_errors if tracker else 0,
                wall_secs=time.monotonic() - T_IMPORTED,
                cpu_secs_in_run=time.process_time() - CPU_IMPORTED,
                rss_mb_at_stop=round(rss_mb(), 1),
            )
            write_summary(args.summary, summary)
            sys.stdout.flush()
            os._exit(3)  # tearing down a million pending tasks would only add noise

    threading.Thread(target=watch, daemon=True).start()


async def main():
    args = parse_args()
    summary = {"tool": "lm-deluge", "import_secs": round(T_IMPORTED - T0, 3)}
    client = None
    start_watchdog(args, summary, lambda: client and client._tracker)
    os.environ.setdefault(KEY_ENV, "sk-bench")
    # The simulator as an OpenAI-compatible model: lm-deluge POSTs {api_base}/chat/completions
    # with "model": name.
    register_model(
        id=MODEL_ID,
        name="gpt-4.1-mini",
        api_base=args.base_url.rstrip("/"),
        api_key_env_var=KEY_ENV,
        api_spec="openai",
    )
    ids, convs, max_tokens = read_prompts(args.input)
    limits = {
        "max_requests_per_minute": args.rpm,
        "max_tokens_per_minute": args.tpm,
        "max_concurrent_requests": args.concurrency,
        "max_attempts": args.max_attempts,
        "request_timeout": args.timeout,
    }
    client = LLMClient(
        MODEL_ID,
        max_new_tokens=max_tokens,
        progress="manual",
        **{k: v for k, v in limits.items() if v is not None},
    )
    summary.update(
        total=len(ids),
        config={
            "max_requests_per_minute": client.max_requests_per_minute,
            "max_tokens_per_minute": client.max_tokens_per_minute,
            "max_concurrent_requests": client.max_concurrent_requests,
            "max_attempts": client.max_attempts,
            "request_timeout": client.request_timeout,
            "max_new_tokens": client.max_new_tokens,
        },
    )

    # Opened here (not by process_prompts_async) so its counters outlive the run.
    client.open(total=0, show_progress=False)
    tracker = client._tracker
    results = await client.process_prompts_async(convs, show_progress=False)
    succeeded = failed = lines = 0
    errors = {}
    with open(args.output, "w") as out:
        for cid, r in zip(ids, results):
            if r is None:
                continue
            if r.is_error:
                failed += 1
                key = str(r.status_code)
                errors[key] = errors.get(key, 0) + 1
            else:
                succeeded += 1
            usage = r.usage
            out.write(
                json.dumps(
                    {
                        "custom_id": cid,
                        "status": "failed" if r.is_error else "succeeded",
                        "status_code": r.status_code,
                        "completion": r.completion,
                        "error": r.error_message if r.is_error else None,
                        "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
                        if usage
                        else None,
                    }
                )
                + "\n"
            )
            lines += 1
    summary.update(
        finished=True,
        stopped=None,
        succeeded=succeeded,
        failed=failed,
        output_lines=lines,
        failures_by_status=errors,
        wall_secs=time.monotonic() - T_IMPORTED,
        cpu_secs_in_run=time.process_time() - CPU_IMPORTED,
        attempts=tracker.total_requests,
        rate_limit_errors=tracker.num_rate_limit_errors,
    )
    client.close()
    write_summary(args.summary, summary)


if __name__ == "__main__":
    asyncio.run(main())
