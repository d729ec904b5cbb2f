"""prisma-ray on a CUDA GPU: the real path run end to end, checked against the CPU path, and measured.

    python benchmarks/gpu.py [--saelens-python PATH] [--steps 30] [--cpu-smoke]

On a machine whose torch sees no CUDA device it says so and exits 0 (nothing is measured). On a GPU:

1. Agreement on a small case (the embedded toy ViT, synthetic `shapes`): the jobs themselves
   (`run_extract`, `run_training` with one Ray Train worker, `run_sweep`, `run_steer`) run once with
   `device: cuda` and once with `device: cpu`, into separate folders, float32 throughout
   (`NVIDIA_TF32_OVERRIDE=0`, autocast off). Printed: the largest difference of the stored activations
   (relative to their standard deviation; tolerance 1e-3), of the trained dictionary's explained variance
   (the same store and seed; tolerance 0.02: the devices' reductions differ, so TopK ties may fall
   differently), of the sweep's metrics for the same checkpoint (tolerance 1e-3) and of the steered
   outputs (tolerance 1e-3 of their scale).
2. Extraction throughput: `ExtractionWorker.extract` (what each extraction actor does per shard: uint8
   crops to the device, normalisation, the forward pass with the hook point cached, token selection,
   copy back, statistics) against the bare timm forward of the same batches already on the device, a
   ViT-B/16 (random weights) at bfloat16. Target >= 0.85. Also the whole shard with its Parquet encoding
   and writing (`ExtractionWorker.process`), which runs on the actor's CPU.
3. Training throughput (d_model 768, 16x = 12,288 latents, batch 4,096, bf16 autocast with float32
   master weights): every architecture with one dictionary per pass, and four TopK dictionaries per pass;
   tokens/s against the encoder-GEMM limit (tokens/s of the bf16 `x @ W_enc` alone on this GPU; target
   >= 0.6 for TopK and BatchTopK, whose backward is sparse; the dense architectures run about 3 GEMMs
   forward and backward, so about 1/3 is their ceiling) and against SAELens 6 on the same GPU (target
   >= 4x), when `--saelens-python` points at a Python with `sae-lens` installed (see
   `benchmarks/sae_train_throughput.py`).
4. Peak GPU memory of each part (`torch.cuda.max_memory_allocated`).

`--cpu-smoke` runs every part on the CPU at tiny sizes: the test suite's check that this script works on a
machine without a GPU. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOY = "prisma-toy-vit-shapes"
TOY_HOOK = "blocks.2.hook_resid_post"


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the real ones on a GPU, tiny ones for `--cpu-smoke`."""

    extract_model: str
    extract_images: int
    extract_batch: int
    d_model: int
    expansion: int
    k: int
    batch: int
    steps: int
    agreement_images: int
    agreement_steps: int


GPU_SIZES = Sizes("timm-vit-base-patch16-224-augreg-in21k", 2048, 256, 768, 16, 32, 4096, 30, 64, 60)
SMOKE_SIZES = Sizes(TOY, 16, 8, 32, 4, 4, 64, 3, 16, 4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` (the device synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return f"{peak:.2f} GiB"


def verdict(value: float, target: float, above: bool = True) -> str:
    ok = value >= target if above else value <= target
    return f"{'meets' if ok else 'MISSES'} target {'>=' if above else '<='} {target:g}"


# ---------------------------------------------------------------------------------------------- 1. agreement


def agreement(root: str, device: str, sizes: Sizes) -> None:
    """The jobs on `device` and on the CPU on the same small case; print the largest differences."""
    import pyarrow.parquet as pq

    from prisma_ray import storage, store
    from prisma_ray.data.sources import SyntheticSource
    from prisma_ray.evaluate.checkpoint import EvalConfig
    from prisma_ray.evaluate.sweep import SweepConfig, run_sweep
    from prisma_ray.extract.config import ExtractConfig
    from prisma_ray.extract.pipeline import run_extract
    from prisma_ray.interpret.steer import SteerConfig, SteerSpec, run_steer
    from prisma_ray.models import toy
    from prisma_ray.models.registry import get_entry
    from prisma_ray.models.token_selection import TokenSelection
    from prisma_ray.sae import DictionaryConfig
    from prisma_ray.train.config import TrainConfig, TrainData
    from prisma_ray.train.job import run_training

    spec = toy.SPECS[get_entry(TOY).architecture]
    datasets = {
        "train": SyntheticSource(
            uri=f"{root}/data-train", generator=spec.dataset.model_copy(update={"n_images": sizes.agreement_images})
        ),
        "test": SyntheticSource(uri=f"{root}/data-test", generator=spec.held_out(sizes.agreement_images // 2)),
    }
    devices = [device, "cpu"] if device != "cpu" else ["cpu", "cpu"]
    roots = {label: f"{root}/{label}" for label in ("device", "cpu")}
    for label, dev in zip(roots, devices):
        for split, dataset in datasets.items():
            run_extract(
                ExtractConfig(
                    model=TOY,
                    hooks=[TOY_HOOK],
                    tokens=TokenSelection(mode="all"),
                    dtype="float32",
                    dataset=dataset,
                    split=split,
                    output=f"{roots[label]}/activations",
                    shard_size=max(8, sizes.agreement_images // 4),
                    progress=False,
                    resources={"device": dev},
                )
            )
    acts = {
        label: store.read_acts(store.store_uri(f"{r}/activations", TOY, TOY_HOOK, "train"))
        for label, r in roots.items()
    }
    scale = float(acts["cpu"].std())
    act_diff = float(np.abs(acts["device"] - acts["cpu"]).max()) / scale
    print(
        f"  extract: stored activations, max |device - cpu| / std = {act_diff:.2e}  ({verdict(act_diff, 1e-3, False)})"
    )

    train_store = store.store_uri(f"{roots['cpu']}/activations", TOY, TOY_HOOK, "train")
    trained = {}
    for label, dev in zip(roots, devices):
        summary = run_training(
            TrainConfig(
                name="agreement",
                runs=f"{roots[label]}/runs",
                data=TrainData(inputs=[train_store]),
                dictionaries=[DictionaryConfig(architecture="topk", k=8, expansion_factor=4, lr=1e-3)],
                batch_size=256,
                steps=sizes.agreement_steps,
                log_every=sizes.agreement_steps,
                workers=1,
                autocast=False,
                resources={"device": dev},
            )
        )
        name = summary.dictionaries[0]
        trained[label] = (summary.metrics[f"{name}/explained_variance"], f"{summary.output}/{name}")
    ev_diff = abs(trained["device"][0] - trained["cpu"][0])
    print(
        f"  train: explained variance {trained['device'][0]:.4f} on the device, {trained['cpu'][0]:.4f} on the CPU, "
        f"|difference| {ev_diff:.2e}  ({verdict(ev_diff, 0.02, False)})"
    )

    checkpoint = trained["cpu"][1]
    rows = {}
    for label, dev in zip(roots, devices):
        swept = run_sweep(
            SweepConfig(
                checkpoints=[checkpoint],
                output=f"{roots[label]}/sweep",
                evaluation=EvalConfig(
                    stores=f"{roots['cpu']}/activations", split="test", max_tokens=2048, splice_samples=8, device=dev
                ),
                progress=False,
            )
        )
        rows[label] = pq.read_table(io.BytesIO(storage.read_bytes(swept.table))).to_pylist()[0]
    metrics = [
        k
        for k in ("explained_variance", "l0", "loss_recovered", "gt_mean_best_auroc")
        if rows["cpu"].get(k) is not None
    ]
    sweep_diff = max(abs(rows["device"][k] - rows["cpu"][k]) / max(abs(rows["cpu"][k]), 1.0) for k in metrics)
    print(
        f"  sweep: {', '.join(metrics)} of one checkpoint, max relative difference {sweep_diff:.2e}  ({verdict(sweep_diff, 1e-3, False)})"
    )

    steered = {}
    for label, dev in zip(roots, devices):
        steered[label] = run_steer(
            SteerConfig(
                checkpoint=checkpoint,
                steer=SteerSpec(latents=[0, 1], value=4.0),
                dataset=datasets["test"],
                samples=8,
                device=dev,
            )
        )
    numbers = [k for k, v in steered["cpu"].items() if isinstance(v, float)]
    steer_diff = max(abs(steered["device"][k] - steered["cpu"][k]) / max(abs(steered["cpu"][k]), 1.0) for k in numbers)
    print(
        f"  steer: {len(numbers)} summary figures, max relative difference {steer_diff:.2e}  ({verdict(steer_diff, 1e-3, False)})"
    )


# ---------------------------------------------------------------------------------------------- 2. extraction


def extraction(root: str, device: torch.device, sizes: Sizes) -> None:
    from prisma_ray.extract.worker import ExtractionWorker, WorkerJob
    from prisma_ray.models.registry import get_entry
    from prisma_ray.models.token_selection import TokenSelection

    entry = get_entry(sizes.extract_model)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    hook = f"blocks.{entry.layers - 1}.hook_resid_post"
    job = WorkerJob(
        model=entry,
        pretrained=entry.source == "prisma",
        seed=0,
        tokens=TokenSelection(mode="all"),
        dtype="float16",
        model_dtype=dtype,
        stores={hook: f"{root}/extraction-store"},
        storage={},
        batch_size=sizes.extract_batch,
        device=str(device),
    )
    worker = ExtractionWorker(job)
    *lead, c, h, w = worker.model.preprocess.input_shape()  # crops are [..., H, W, 3], as decoding gives them
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (sizes.extract_images, *lead, h, w, c), dtype=np.uint8)
    ids = np.array([f"s{i}" for i in range(len(pixels))])
    bare_module = worker.model.model
    batches = [
        worker.inputs(pixels[i : i + job.batch_size], ids[i : i + job.batch_size])[0]
        for i in range(0, len(pixels), job.batch_size)
    ]

    def bare() -> None:
        with torch.inference_mode():
            for x in batches:
                bare_module(x)

    tokens = sizes.extract_images * worker.model.token_layout.n_tokens
    t_bare = median_seconds(bare, device, 3, 1)
    t_extract = median_seconds(lambda: worker.extract(pixels, ids, [hook]), device, 3, 1)
    data = _shard(pixels, ids)
    t_process = median_seconds(lambda: worker.process(0, data, [hook]), device, 2, 1)
    unit, per = "tokens", tokens
    print(
        f"  model {entry.name} ({'its weights' if job.pretrained else 'random weights'}) at {dtype}, batch {job.batch_size}, {sizes.extract_images} images, hook {hook}"
    )
    print(f"  bare forward (inputs on the device)        {per / t_bare:12.0f} {unit}/s")
    print(
        f"  extraction (crops in, activations back)    {per / t_extract:12.0f} {unit}/s  ratio {t_bare / t_extract:.3f}  "
        f"({verdict(t_bare / t_extract, 0.85)})"
    )
    print(
        f"  ... with Parquet encoding and writing      {per / t_process:12.0f} {unit}/s  ratio {t_bare / t_process:.3f}"
    )
    print(f"  peak GPU memory {peak_memory(device)}")


def _shard(pixels: np.ndarray, ids: np.ndarray):
    from prisma_ray.data.shards import ShardData

    return ShardData(sample_ids=ids, labels=np.zeros(len(ids), np.int64), pixels=pixels)


# ---------------------------------------------------------------------------------------------- 3. training


def training(device: torch.device, sizes: Sizes, saelens_python: str | None) -> None:
    from typing import get_args

    from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer
    from prisma_ray.sae.config import K_ARCHITECTURES, Architecture
    from prisma_ray.sae.synthetic import sparse_dictionary_data

    d, n, batch = sizes.d_model, sizes.d_model * sizes.expansion, sizes.batch
    autocast = device.type == "cuda"
    data = sparse_dictionary_data(batch * sizes.steps, d, 4 * d, sizes.k, seed=0).acts
    host = [data[i * batch : (i + 1) * batch] for i in range(sizes.steps)]
    if device.type == "cuda":
        host = [b.pin_memory() for b in host]
    sites = Sites(inputs=(Site(name="h", width=d),))

    x = torch.randn(batch, d, device=device, dtype=torch.bfloat16 if autocast else torch.float32)
    W = torch.randn(d, n, device=device, dtype=x.dtype)
    gemm = batch / median_seconds(lambda: x @ W, device, 20, 3)
    print(f"  d_model {d}, {n} latents, k {sizes.k}, batch {batch}, autocast {'bf16' if autocast else 'off'}")
    print(f"  encoder GEMM alone (x @ W_enc)             {gemm:12.0f} tokens/s")

    def rate(configs: list) -> float:
        trainer = Trainer(configs, sites, sizes.steps, device=device, autocast=autocast)
        trainer.initialize(host[0])
        steps = iter(host * 2)
        return batch / median_seconds(lambda: trainer.train_step(next(steps)), device, sizes.steps - 2, 2)

    def config(arch: str, **extra) -> DictionaryConfig:
        fields = {"k": sizes.k} if arch in K_ARCHITECTURES else {}
        if arch == "matryoshka_batchtopk":
            fields["matryoshka_widths"] = [n // 4, n // 2, n]
        return DictionaryConfig(architecture=arch, expansion_factor=sizes.expansion, lr=2e-4, **{**fields, **extra})

    ours = {}
    for arch in get_args(Architecture):
        ours[arch] = rate([config(arch)])
        target = f"  ({verdict(ours[arch] / gemm, 0.6)})" if arch in ("topk", "batchtopk") else ""
        print(
            f"  {arch:<10} 1 dictionary per pass        {ours[arch]:12.0f} tokens/s  ratio to GEMM {ours[arch] / gemm:.3f}{target}"
        )
    ks = [sizes.k // 2, sizes.k, 2 * sizes.k, 4 * sizes.k]
    several = rate([config("topk", k=k, name=f"topk-{k}") for k in ks])
    print(
        f"  topk       {len(ks)} dictionaries per pass      {several:12.0f} tokens/s  "
        f"({len(ks) * several:.0f} dictionary-tokens/s; ratio to {len(ks)} GEMMs {several * len(ks) / gemm:.3f})"
    )
    print(f"  peak GPU memory {peak_memory(device)}")
    if saelens_python:
        _saelens(saelens_python, data.numpy(), device, autocast, ours["topk"], sizes)
    else:
        print("  SAELens: not compared (pass --saelens-python, a Python with sae-lens 6 and this torch)")


def _saelens(python: str, data: np.ndarray, device: torch.device, autocast: bool, ours: float, sizes: Sizes) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sae_train_throughput import run_saelens

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/acts.npy"
        np.save(path, data)
        for label, sparse in (("dense", False), ("use_sparse_activations", True)):
            times = run_saelens(python, path, 2, sparse, device=str(device), autocast=autocast)
            if isinstance(times, str):
                print(f"  SAELens 6 ({label}) failed: {times}")
                continue
            theirs = sizes.batch / statistics.median(times)
            print(
                f"  SAELens 6 topk ({label:<22}) {theirs:12.0f} tokens/s  prisma-ray is {ours / theirs:.2f}x  ({verdict(ours / theirs, 4.0)})"
            )


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saelens-python", help="a Python with sae-lens 6 installed (and this torch), to compare")
    parser.add_argument("--steps", type=int, default=None, help="measured training steps per configuration")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("benchmarks/gpu.py needs a CUDA GPU and torch sees none on this machine: nothing measured.")
        return 0
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")  # float32 means float32 in the agreement part
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
    if args.steps:
        sizes = Sizes(**{**sizes.__dict__, "steps": args.steps})
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: figures mean nothing)"
    print(f"prisma-ray on {name}, torch {torch.__version__}")
    import ray

    with tempfile.TemporaryDirectory() as root:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)  # the jobs' own lines only
        print("1. agreement with the CPU path (toy ViT, synthetic shapes; jobs with device cuda and cpu)")
        agreement(root, device.type, sizes)
        ray.shutdown()
        print("2. extraction")
        extraction(root, device, sizes)
        print("3. training")
        training(device, sizes, args.saelens_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
