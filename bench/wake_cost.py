"""What one sleep/wake-up cycle costs this machine in CPU: 2,000 sleeps of 10 ms.

    python3 bench/wake_cost.py

A process that handles one event every 10 ms (a paced client at 100 requests/s) pays this
per event before doing any work. See BENCHMARKS.md.
"""

import resource
import time

N = 2000
for _ in range(N):
    time.sleep(0.01)
r = resource.getrusage(resource.RUSAGE_SELF)
cpu = r.ru_utime + r.ru_stime
print(f"{N} wake-ups: {cpu:.3f} s CPU, {cpu / N * 1e6:.0f} us each")
