"""Where extraction's time goes, part by part: what `benchmarks/extract_throughput.py` times end to end, taken
apart in one fresh process without Ray (so it counts what a new extraction actor pays), in CPU seconds (robust
on a loaded machine) and wall seconds.

Start-up of an extraction actor: its imports (torch; torchvision, which timm imports for its FX feature
extraction; timm; prisma-ray's worker modules with Ray) and its model build; the driver's planning. Where the
pool would be one CPU actor on the driver's own machine the driver runs the model itself (`resources.run_in:
auto`) and pays only the imports its process lacks (`prisma-ray extract` has torch from planning) and the build. Then per
shard of `--shard-size` images: (a) the pipeline's decode to uint8 crops (`decode_shard`), its forward pass
with normalisation and statistics (`ExtractionWorker.extract`), the rows encoded (`store.token_table`) and the
zstd Parquet shard written; (b) the for-loop's decode (PIL + torchvision transforms), forward with the hook
and float16 cast, and `torch.save`. The shard figures are the mean over `--shards` shards after a first one.

    .venv/bin/python benchmarks/extract_breakdown.py [--threads 2] [--shards 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
rows = []
def timed(name, fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    rows.append((name, time.process_time() - cpu, time.perf_counter() - wall))
    return out
timed("import torch", lambda: __import__("torch"))
timed("import torchvision (timm imports it)", lambda: __import__("torchvision"))
timed("import timm", lambda: __import__("timm"))
timed("import prisma_ray worker modules, ray", lambda: __import__("prisma_ray.extract.worker") and __import__("prisma_ray.runtime.pool"))
import io, numpy as np, torch
from pathlib import Path
from torch.utils.data import DataLoader
sys.path.insert(0, args["benchmarks"])
import extract_throughput as bench
from prisma_ray import store
from prisma_ray.data.shards import decode_shard
from prisma_ray.data.sources import SyntheticSource, list_refs, with_resolved_storage
from prisma_ray.extract.config import ExtractConfig
from prisma_ray.extract.plan import plan_extract
from prisma_ray.extract.worker import ExtractionWorker
from prisma_ray.models.loading import load_model
work = Path(args["work"])
n = args["shard_size"] * (args["shards"] + 1)
data = with_resolved_storage(SyntheticSource(uri=str(work / "shapes"), generator=dict(name="shapes", n_images=n, image_size=224)))
refs = list_refs(data)
cfg = ExtractConfig(model=bench.MODEL, pretrained=False, hooks=[args["hook"]], dataset=data, output=str(work / "out"),
                    shard_size=args["shard_size"], batch_size=args["batch_size"], dtype="float16", progress=False)
plan = timed("driver: plan_extract", lambda: plan_extract(cfg))
worker = timed(f"model build ({args['threads']} torch threads)", lambda: ExtractionWorker(plan.job("cpu", args["threads"])))
hook = args["hook"]
def a_shard(i, log):
    t = timed if log else (lambda _name, fn: fn())
    d = t("(a) decode to uint8 crops", lambda: decode_shard(plan.shards[i], plan.spec, plan.fmt))
    acts, stats, kept = t("(a) normalise, forward, statistics", lambda: worker.extract(d.pixels, d.keys(), [hook], i))
    table = t("(a) encode rows", lambda: store.token_table(d.sample_ids[kept.sample].tolist(), kept.position.astype(np.int16), np.full(len(kept.sample), -1, np.int16), kept.kind, acts[hook], "float16"))
    t("(a) zstd Parquet shard written", lambda: worker.writers[hook].write_shard(i, table, stats[hook]))
model = load_model(bench.MODEL, pretrained=False, seed=0)
net, layer = model.model, int(bench._RESID_POST.match(hook).group(1))
captured = []
net.blocks[layer].register_forward_hook(lambda _m, _i, output: captured.append(output))
def b_shard(i, log):
    t = timed if log else (lambda _name, fn: fn())
    part = refs[i * args["shard_size"] : (i + 1) * args["shard_size"]]
    batches = t("(b) decode (PIL + ToTensor + Normalize)", lambda: list(DataLoader(bench.ImageFiles(part, model.preprocess), batch_size=args["batch_size"])))
    def forward():
        with torch.inference_mode():
            return [(net(x), captured.pop().to(torch.float16))[1] for x, _ in batches]
    acts = t("(b) forward, hook, float16", forward)
    t("(b) torch.save", lambda: torch.save({"acts": torch.cat([a.reshape(-1, a.shape[-1]) for a in acts])}, io.BytesIO()))
startup = len(rows)
a_shard(0, False); b_shard(0, False)
for i in range(1, args["shards"] + 1):
    a_shard(i, True); b_shard(i, True)
print(json.dumps({"rows": rows, "startup": startup, "shards": args["shards"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook", default="blocks.11.hook_resid_post")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the actor's default on 2 CPUs: 2)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shards", type=int, default=3, help="shards timed after a first, untimed one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        child = dict(vars(args), work=work, benchmarks=str(Path(__file__).resolve().parent))
        env_cmd = [sys.executable, "-c", _CHILD, json.dumps(child)]
        done = subprocess.run(env_cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr[-4000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows, startup, shards = result["rows"], result["startup"], result["shards"]
    print(f"in one fresh process, {args.threads} torch threads; shards of {args.shard_size} images (mean of {shards})")
    print(f"{'':<50} {'CPU s':>7} {'wall s':>7}")
    for name, cpu, wall in rows[:startup]:
        print(f"{name:<50} {cpu:7.2f} {wall:7.2f}")
    totals: dict[str, list[float]] = {}
    for name, cpu, wall in rows[startup:]:
        acc = totals.setdefault(name, [0.0, 0.0])
        acc[0] += cpu / shards
        acc[1] += wall / shards
    for side in ("(a)", "(b)"):
        parts = {k: v for k, v in totals.items() if k.startswith(side)}
        for name, (cpu, wall) in parts.items():
            print(f"{name + ' per shard':<50} {cpu:7.2f} {wall:7.2f}")
        cpu, wall = (sum(v[i] for v in parts.values()) for i in range(2))
        print(f"{side + ' per shard in all':<50} {cpu:7.2f} {wall:7.2f}")


if __name__ == "__main__":
    main()
