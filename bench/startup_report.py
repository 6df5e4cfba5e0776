"""Read bench/startup_sampler's samples: where a trainer's start-up wall time went.

    python bench/startup_report.py PREFIX.PID.jsonl [--until 50] [--top 40] [--depth 12]

Prints the functions that were on the main thread's stack longest (inclusive wall seconds),
then a timeline: for each `--bucket` seconds, the stack (cut to `--depth` frames below the entry point) seen most
often in it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def load(path: str, until: float | None) -> list[tuple[float, list[str]]]:
    samples = []
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if until is None or row["t"] <= until:
                samples.append((row["t"], row["stack"]))
    return samples


def inclusive(samples) -> collections.Counter:
    """Each sample stands for the time until the next one (a busy main thread holds the GIL, so samples come
    less often than every 10 ms)."""
    seconds: collections.Counter = collections.Counter()
    for (t, stack), (t_next, _) in zip(samples, samples[1:]):
        for name in set(stack):
            seconds[name] += t_next - t
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("--until", type=float, help="only samples up to this many seconds")
    ap.add_argument("--from", dest="start", type=float, default=0.0)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--bucket", type=float, default=1.0)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--skip", type=int, default=0, help="outermost frames to leave out of the timeline")
    args = ap.parse_args(argv)
    samples = [s for s in load(args.samples, args.until) if s[0] >= args.start]
    if not samples:
        print("no samples", file=sys.stderr)
        return 1
    interval = (samples[-1][0] - samples[0][0]) / max(len(samples) - 1, 1)
    print(f"{len(samples)} samples, {samples[0][0]:.2f}-{samples[-1][0]:.2f} s, {interval * 1000:.1f} ms apart")
    print("\ninclusive wall seconds")
    for name, secs in inclusive(samples).most_common(args.top):
        print(f"{secs:8.2f}  {name}")
    print("\ntimeline")
    buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for t, stack in samples:
        buckets[int(t // args.bucket)][" > ".join(stack[args.skip:args.skip + args.depth])] += 1
    for b in sorted(buckets):
        stack, n = buckets[b].most_common(1)[0]
        print(f"{b * args.bucket:6.1f}s {n:3d}  {stack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
