"""What a Ray decode worker pays to import the code it runs: `prisma_ray.data.shards` (torch-free, what decode
tasks import) against `prisma_ray.extract.worker` (the module that held the decoding before, with torch).

Each import runs in a fresh interpreter, `--repeats` times alternately; prints the median max RSS and wall
time of each and their ratios.

    .venv/bin/python benchmarks/decode_import_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = (
    "import json, resource, sys, time; t = time.perf_counter(); import {module}; "
    "print(json.dumps({{'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "'seconds': time.perf_counter() - t, 'torch': 'torch' in sys.modules}}))"
)


def measure(module: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modules = {
        "(a) prisma_ray.data.shards": "prisma_ray.data.shards",
        "(b) prisma_ray.extract.worker": "prisma_ray.extract.worker",
    }
    runs: dict[str, list[dict]] = {label: [] for label in modules}
    for _ in range(args.repeats):
        for label, module in modules.items():
            runs[label].append(measure(module))
    medians = {}
    for label, rows in runs.items():
        rss = statistics.median(r["rss_mib"] for r in rows)
        seconds = statistics.median(r["seconds"] for r in rows)
        medians[label] = (rss, seconds)
        print(f"{label:28s} {rss:6.0f} MiB max RSS   {seconds:5.2f} s import   torch loaded: {rows[0]['torch']}")
    (a_rss, a_s), (b_rss, b_s) = medians.values()
    print(f"ratio a/b: memory {a_rss / b_rss:.2f}, import time {a_s / b_s:.2f}")


if __name__ == "__main__":
    main()
