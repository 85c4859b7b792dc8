#!/usr/bin/env python3
"""The benchmarks' input: N chat requests, one a line, shaped like the engine benchmark's.

    bench/gen_requests.py N FILE [MODEL]

MODEL defaults to gpt-4.1-mini. FILE is written whole or not at all.
"""

import os
import sys

LINE = (
    '{"custom_id":"q%d","model":"%s","messages":[{"role":"user","content":"Question %d: '
    'summarise the plot of a short story in one sentence."}],"max_tokens":64}\n'
)


def generate(n, path, model="gpt-4.1-mini"):
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            f.write(LINE % (i, model, i))
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    generate(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])
