"""Extraction throughput: (a) the pipeline (`prisma_ray.extract.run_extract`, default resources) against (b) the
usual single-process loop of interpretability tools (a torch DataLoader, a forward hook on the block,
`torch.save` of float16 shards), on the same images, model (random weights) and hook point, in one run.

Prints tokens/s of each (median over `--repeats`, run alternately), the ratio a/b, bytes per stored
activation value, how far the stored activations of (a) are from those of (b), and where the time goes:
start-up (a: planning, the worker started and its model built, the first shard decoded, as
`ExtractSummary.startup_seconds`; b: the model built) against the steady state (the rest), with the
steady-state ratio. Both sides are timed end to end from an up-and-running Ray in this process (model build,
reading, decoding, forward, writing); the dataset is generated and Ray started before any timing. The default
hook is the last block, so neither side can end the forward pass early.

    .venv/bin/python benchmarks/extract_throughput.py [--images 512] [--repeats 2] [--run-in actors] [--cold]

On this 2-CPU single-node Ray the pool would be one CPU actor, so (a)'s default (`resources.run_in: auto`) runs
the model in the driver: no actor process that imports torch, torchvision and timm and builds the model again
(`benchmarks/extract_breakdown.py` takes that start-up apart in CPU seconds: ~4-5 CPU s, a third of a
512-image run). `--run-in actors` adds (c), the pipeline on its actor as before, to show what that start-up costs
in the same run. Since (a) then profits from this process's imports as (b) does, `--cold` also times (d) a fresh
`prisma-ray extract` process (default resources, no Ray address: no Ray is started) against (e) a fresh process
running the loop (b), both from start to exit with their own imports, and prints e/d. Quiet, 2026-12-08 (median
of 2): 512 images a/b 0.97, a/c 1.36, cold e/d 0.97; 2,048 images a/b 1.00, a/c 1.07 (README, "Extraction").

`--pool ACTORSxTHREADS`, `--decode task|actor` and `--run-in actors|driver` add (c): the pipeline with that many
actors and torch threads each (`2x1` is the pool's default on 2 CPUs before it became one actor per 2 CPUs),
shards decoded there (`task`: one read task per shard, the CPU default before the actors decoded their own
shards) and/or the model run there, run alternately with (a) and (b), and prints a/c.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from prisma_ray import store
from prisma_ray.data.sources import SampleRef, SyntheticSource, list_refs, with_resolved_storage
from prisma_ray.models import PreprocessSpec
from prisma_ray.models.loading import load_model, resolve_entry

# Ray and the pipeline are imported where (a) runs, not here: the cold for-loop process (`--cold`) imports this
# module and must pay only what a for-loop needs (torch, torchvision, timm, PIL).

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")

MODEL = "timm-vit-tiny-patch16-224-augreg-in21k-ft-in1k"  # random weights, as in the baseline


class ImageFiles(Dataset):
    """The images of `refs` through timm's eval transform (resize, centre crop, to tensor, normalise)."""

    def __init__(self, refs: list[SampleRef], spec: PreprocessSpec):
        self.refs = refs
        size = spec.image_size[0]
        self.transform = transforms.Compose(
            [
                transforms.Resize(math.floor(size / spec.crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(spec.mean, spec.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.refs[i].uri) as img:
            return self.transform(img.convert("RGB")), i


def baseline(refs: list[SampleRef], args: argparse.Namespace, out: Path) -> dict:
    """(b): DataLoader -> forward with a hook on `blocks[l]` -> float16 shards with `torch.save`."""
    start = time.perf_counter()
    model = load_model(args.model, pretrained=False, seed=0)
    net, layer = model.model, int(_RESID_POST.match(args.hook).group(1))
    captured: list[torch.Tensor] = []
    handle = net.blocks[layer].register_forward_hook(lambda _m, _i, output: captured.append(output))
    loader = DataLoader(ImageFiles(refs, model.preprocess), batch_size=args.batch_size)
    out.mkdir(parents=True)
    acts, ids, shard, tokens = [], [], 0, 0
    startup = time.perf_counter() - start

    def save() -> None:
        nonlocal acts, ids, shard
        torch.save({"acts": torch.cat(acts), "sample_id": ids}, out / f"shard-{shard:05d}.pt")
        acts, ids, shard = [], [], shard + 1

    with torch.inference_mode():
        for x, index in loader:
            net(x)
            batch = captured.pop().to(torch.float16)
            acts.append(batch.reshape(-1, batch.shape[-1]))
            ids += [refs[i].sample_id for i in index.tolist()]
            tokens += batch.shape[0] * batch.shape[1]
            if len(ids) >= args.shard_size:
                save()
        if acts:
            save()
    handle.remove()
    seconds = time.perf_counter() - start
    nbytes = sum(f.stat().st_size for f in out.iterdir())
    return {"tokens": tokens, "seconds": seconds, "startup": startup, "bytes": nbytes, "values": tokens * model.d_model}


def extract_config(data: SyntheticSource, args: argparse.Namespace, out: Path, resources: dict | None = None) -> dict:
    """(a)'s `ExtractConfig` fields: the same images, model and hook as (b), all tokens, float16 (`resources`: its
    `resources:` block; default: the pool's own choice)."""
    return dict(
        model=args.model,
        pretrained=False,
        hooks=[args.hook],
        dataset=data.model_dump(mode="json"),
        output=str(out),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype="float16",
        progress=False,
        resources=resources or {},
    )


def pipeline(data: SyntheticSource, args: argparse.Namespace, out: Path, resources: dict | None = None) -> dict:
    """(a): `run_extract` of `extract_config` in this process, on its Ray."""
    from prisma_ray.extract.config import ExtractConfig
    from prisma_ray.extract.pipeline import run_extract

    summary = run_extract(ExtractConfig(**extract_config(data, args, out, resources)))
    return {
        "tokens": summary.tokens,
        "seconds": summary.seconds,
        "startup": summary.startup_seconds,
        "bytes": summary.bytes,
        "values": summary.values,
        "store": summary.stores[args.hook],
    }


def cold(data: SyntheticSource, args: argparse.Namespace, out: Path, side: str) -> float:
    """Wall seconds of a fresh process from its start to its exit, paying its own imports: (d) `prisma-ray extract`
    of `extract_config` (its default resources, no Ray address: as a user runs it on this machine), or (e) this
    module's for-loop (b) alone (`cold_loop`: torch, torchvision, timm imported, no Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if side == "d":
        config = out.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(extract_config(data, args, out)))
        command = [sys.executable, "-m", "prisma_ray.cli", "extract", str(config)]
    else:
        loop = {**vars(args), "data": data.model_dump(mode="json"), "out": str(out)}
        code = "import sys, json, extract_throughput as b; b.cold_loop(json.loads(sys.argv[1]))"
        command = [sys.executable, "-c", code, json.dumps(loop)]
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"({side}) failed: {' '.join(command[:4])} ...\n{done.stderr[-4000:]}")
    return seconds


def cold_loop(loop: dict) -> None:
    """(e): the for-loop (b) over the generated images of `loop["data"]`, in the process that calls it."""
    refs = list_refs(with_resolved_storage(SyntheticSource(**loop["data"])))
    baseline(refs, argparse.Namespace(**loop), Path(loop["out"]))


def extract_store(out: Path, args: argparse.Namespace) -> str:
    """Where `prisma-ray extract` of `extract_config(..., out)` writes its store."""
    return str(out / resolve_entry(args.model).name / args.hook / "train")


def max_difference(baseline_dir: Path, store_uri: str) -> float:
    """Largest |a - b| between the activations of one baseline shard and the same tokens in the store."""
    saved = torch.load(baseline_dir / "shard-00000.pt", weights_only=True)
    table = store.read_table(store_uri).sort_by([("sample_id", "ascending"), ("token", "ascending")])
    ids = table.column("sample_id").to_pylist()
    first = {sid: i for i, sid in reversed(list(enumerate(ids)))}
    n_tokens = len(saved["acts"]) // len(saved["sample_id"])
    rows = [first[sid] + t for sid in saved["sample_id"] for t in range(n_tokens)]
    ours = store.decode_acts(table.column("act").take(rows), "float16")
    return float(np.abs(ours - saved["acts"].float().numpy()).max())


def report(name: str, runs: list[dict]) -> tuple[float, float]:
    """Print a side's line; return its median tokens/s end to end and in the steady state (after start-up)."""
    rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
    steady = statistics.median(r["tokens"] / max(r["seconds"] - r["startup"], 1e-9) for r in runs)
    per_value = runs[0]["bytes"] / runs[0]["values"]
    seconds = ", ".join(f"{r['seconds']:.1f} ({r['startup']:.1f} start-up)" for r in runs)
    print(f"{name:<46} {rate:9.0f} tokens/s   {per_value:.3f} bytes/value   runs {seconds} s")
    return rate, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a timm ViT in the registry")
    parser.add_argument("--hook", default="blocks.11.hook_resid_post", help="blocks.{l}.hook_resid_post")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224, help="side of the generated images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--pool", help="ACTORSxTHREADS: also run (c), the pipeline on that pool shape, e.g. 2x1")
    parser.add_argument("--decode", choices=["task", "actor"], help="also run (c), with shards decoded there")
    parser.add_argument(
        "--run-in", choices=["actors", "driver"], help="also run (c), with the model in Ray actors or in this process"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="also time (d) a fresh `prisma-ray extract` process against (e) a fresh for-loop process, each from "
        "its start to its exit (imports included), run alternately `--repeats` times before Ray starts here",
    )
    parser.add_argument("--workdir", help="keeps the generated images (default: a temporary folder)")
    args = parser.parse_args()
    pool = {}
    if args.pool:
        if not re.fullmatch(r"\d+x\d+", args.pool):
            parser.error(f"--pool {args.pool}: give ACTORSxTHREADS, e.g. 2x1")
        pool = dict(zip(("actors", "torch_threads"), map(int, args.pool.split("x")), strict=True))
    if args.decode:
        pool["decode"] = args.decode
    if args.run_in:
        pool["run_in"] = args.run_in
    if not _RESID_POST.match(args.hook) or resolve_entry(args.model).source != "timm":
        parser.error("the baseline hooks a timm ViT block: use a timm model and --hook blocks.{l}.hook_resid_post")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = with_resolved_storage(
            SyntheticSource(
                uri=str(work / "shapes"),
                generator=dict(name="shapes", n_images=args.images, image_size=args.image_size),
            )
        )
        refs = list_refs(data)
        outputs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
        colds: dict[str, list[float]] = {"d": [], "e": []}
        for r in range(args.repeats if args.cold else 0):
            for side in "ed" if r % 2 == 0 else "de":
                colds[side].append(cold(data, args, outputs / f"{side}-{r}", side))
        cold_difference = max_difference(outputs / "e-0", extract_store(outputs / "d-0", args)) if args.cold else 0
        import ray

        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        sides = "bac" if pool else "ba"
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                out = outputs / f"{side}-{r}"
                if side == "b":
                    runs[side].append(baseline(refs, args, out))
                else:
                    runs[side].append(pipeline(data, args, out, pool if side == "c" else None))
        difference = max_difference(outputs / "b-0", runs["a"][0]["store"])
        ray.shutdown()

    print(
        f"{args.model} (random weights), {args.hook}, all tokens, float16; {args.images} images "
        f"{args.image_size}px, batch {args.batch_size}, shards of {args.shard_size}; {args.num_cpus} CPUs, "
        f"load average (1, 5 min) {os.getloadavg()[0]:.1f}, {os.getloadavg()[1]:.1f}; median of {args.repeats} runs each"
    )
    a, a_steady = report("(a) prisma-ray run_extract, default resources", runs["a"])
    b, b_steady = report("(b) DataLoader + hook + torch.save", runs["b"])
    print(f"ratio a/b {a / b:.2f}   max |a - b| on one shard {difference:.2g} (float16 storage)")
    print(
        f"steady state (after start-up): a {a_steady:.0f} tokens/s, b {b_steady:.0f} tokens/s, ratio {a_steady / b_steady:.2f}"
    )
    if pool:
        shape = " ".join(f"{k}={v}" for k, v in pool.items())
        c, c_steady = report(f"(c) pipeline, {shape}", runs["c"])
        print(f"ratio a/c {a / c:.2f}   steady state a/c {a_steady / c_steady:.2f}")
    if args.cold:
        d, e = (statistics.median(colds[side]) for side in "de")
        runs_d, runs_e = (", ".join(f"{t:.1f}" for t in colds[side]) for side in "de")
        print(f"{'(d) fresh `prisma-ray extract` process':<46} {d:6.1f} s wall, start to exit   runs {runs_d} s")
        print(f"{'(e) fresh for-loop (b) process':<46} {e:6.1f} s wall, start to exit   runs {runs_e} s")
        print(f"cold ratio e/d (speed of d against e) {e / d:.2f}   max |d - e| on one shard {cold_difference:.2g}")


if __name__ == "__main__":
    main()
