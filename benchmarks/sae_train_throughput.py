"""Training throughput of a TopK SAE on CPU: prisma-ray against SAELens 6, and Ray Train scaling.

The same SAE (d_model 768, 16x = 12,288 latents, k 32, float32, Adam, AuxK) is trained on the
same synthetic activations (batch 4,096 tokens) by:
- prisma-ray's training step (`prisma_ray.sae.Trainer`, the code every Ray Train worker runs),
- SAELens 6 (`SAETrainer.step` on a `TopKTrainingSAE`, run in its own virtualenv with the same
  torch, see `--saelens-python`), with its default dense activations and with
  `use_sparse_activations=True`,
interleaved so that a noisy machine slows both alike; tokens/s from the median step time.
Then the whole `prisma-ray train` job (Ray Data reading a Parquet store, Ray Train) with 1 and 2
workers on the same data, steady-state tokens/s from the job's own metric.

    python benchmarks/sae_train_throughput.py [--steps 8] [--skip-ray]

SAELens goes in a separate venv because its pins (transformer-lens, datasets, wandb, ...) are not
the project's: `python3 -m venv .venv-saelens && .venv-saelens/bin/pip install sae-lens==6.54.12`
(with a `.pth` file pointing at `.venv`'s site-packages to reuse its torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

D_MODEL, EXPANSION, K, BATCH = 768, 16, 32, 4096
REPO = Path(__file__).resolve().parents[1]


def make_data(steps: int) -> np.ndarray:
    from prisma_ray.sae.synthetic import sparse_dictionary_data

    return sparse_dictionary_data(BATCH * steps, D_MODEL, 4 * D_MODEL, K, seed=0).acts.numpy()


def ours_step_times(data: np.ndarray, warmup: int) -> list[float]:
    from prisma_ray.sae import DictionaryConfig, Site, Sites, Trainer

    cfg = DictionaryConfig(architecture="topk", k=K, expansion_factor=EXPANSION, lr=2e-4)
    steps = len(data) // BATCH
    trainer = Trainer([cfg], Sites(inputs=(Site(name="h", width=D_MODEL),)), steps)
    batches = [torch.from_numpy(data[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]
    trainer.initialize(batches[0])
    times = []
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def saelens_step_times(
    data_path: str, warmup: int, sparse: bool, device: str = "cpu", autocast: bool = False
) -> list[float]:
    """Run inside the SAELens venv: SAETrainer.step on each batch, as `SAETrainer.fit` does (on `device`, with
    SAELens's `autocast`; batches moved to the device before each step, as its activation store does)."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    data = np.load(data_path)
    steps = len(data) // BATCH
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_MODEL,
            d_sae=EXPANSION * D_MODEL,
            k=K,
            dtype="float32",
            device=device,
            use_sparse_activations=sparse,
        )
    )
    batches = [torch.from_numpy(data[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=BATCH * steps,
            train_batch_size_samples=BATCH,
            lr=2e-4,
            lr_end=2e-4,
            device=device,
            autocast=autocast,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=iter(batches),
    )
    times = []
    cuda = device.startswith("cuda")
    for batch in batches:
        start = time.perf_counter()
        trainer.maybe_reset_sparsity()
        trainer.step(batch.to(device))
        trainer.n_training_steps += 1
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def run_saelens(
    python: str, data_path: str, warmup: int, sparse: bool, device: str = "cpu", autocast: bool = False
) -> list[float] | str:
    """SAELens step times (on `device`, with its `autocast`), or the error it stopped with."""
    cmd = [python, __file__, "--saelens-worker", data_path, "--warmup", str(warmup), "--device", device]
    cmd += (["--sparse"] if sparse else []) + (["--autocast"] if autocast else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode:
        return next(line for line in reversed(out.stderr.splitlines()) if "Error" in line)[:160]
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_tokens_per_s(store_uri: str, workers: int, steps: int, tmp: str) -> float:
    """Steady-state tokens/s of `prisma-ray train` (the second half of the run) with `workers` workers."""
    from prisma_ray.train.config import TrainConfig
    from prisma_ray.train.job import run_training

    cfg = TrainConfig.model_validate(
        {
            "name": f"bench-{workers}",
            "runs": f"{tmp}/runs",
            "data": {"inputs": [store_uri], "normalize": "none"},
            "dictionaries": [{"architecture": "topk", "k": K, "expansion_factor": EXPANSION, "lr": 2e-4}],
            "batch_size": BATCH,
            "steps": steps,
            "log_every": steps // 2,
            "checkpoint_every": 10 * steps,
            "workers": workers,
            "resources": {"cpus_per_actor": 1, "torch_threads": max(1, os.cpu_count() // workers)},
        }
    )
    return run_training(cfg).metrics["tokens_per_s"]


def write_store(data: np.ndarray, uri: str) -> str:
    from prisma_ray import store

    writer = store.StoreWriter(uri)
    shards = np.array_split(np.arange(len(data)), 4)
    for i, rows in enumerate(shards):
        table = store.token_table(
            [f"s{r}" for r in rows],
            np.zeros(len(rows)),
            np.full(len(rows), -1),
            np.full(len(rows), 2),
            data[rows],
            "float32",
        )
        writer.write_shard(i, table, store.RunningStats.of(data[rows]))
    stats = writer.merged_stats(set(range(len(shards))), D_MODEL)
    writer.write_manifest(
        store.Manifest(
            model="synthetic",
            hook="blocks.0.hook_resid_post",
            split="train",
            dtype="float32",
            d_model=D_MODEL,
            token_selection={},
            token_layout={},
            dataset={},
            config_hash="bench",
            n_samples=len(data),
            n_tokens=len(data),
            shards=[store.shard_name(i) for i in range(len(shards))],
            mean=stats.mean.tolist(),
            std=np.sqrt(stats.var).tolist(),
            mean_norm=stats.mean_norm,
        )
    )
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--saelens-python", default=str(REPO / ".venv-saelens" / "bin" / "python"))
    parser.add_argument("--ray-steps", type=int, default=12)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--saelens-worker", metavar="DATA.npy", help=argparse.SUPPRESS)
    parser.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.saelens_worker:
        print(json.dumps(saelens_step_times(args.saelens_worker, args.warmup, args.sparse, args.device, args.autocast)))
        return

    data = make_data(args.warmup + args.steps)
    print(
        f"TopK SAE: d_model {D_MODEL}, {EXPANSION * D_MODEL} latents, k {K}, batch {BATCH}, float32, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; {args.steps} measured steps per run"
    )
    ours: list[float] = []
    theirs: dict[str, list[float] | str] = {"SAELens 6 (default, dense)": [], "SAELens 6 (use_sparse_activations)": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = f"{tmp}/acts.npy"
        np.save(data_path, data)
        have_saelens = Path(args.saelens_python).exists()
        if not have_saelens:
            print(f"SAELens venv not found at {args.saelens_python}: comparing nothing")
        ours += ours_step_times(data, args.warmup)
        if have_saelens:
            for label, sparse in zip(theirs, (False, True)):
                theirs[label] = run_saelens(args.saelens_python, data_path, args.warmup, sparse)
        ours += ours_step_times(data, args.warmup)

        rate = BATCH / statistics.median(ours)
        print(f"{'prisma-ray (Trainer.train_step)':<40} {rate:9.0f} tokens/s  (median of {len(ours)} steps)")
        for label, times in theirs.items():
            if isinstance(times, str):
                print(f"{label:<40} failed: {times}")
            elif times:
                theirs_rate = BATCH / statistics.median(times)
                print(f"{label:<40} {theirs_rate:9.0f} tokens/s  -> prisma-ray is {rate / theirs_rate:.2f}x")

        if not args.skip_ray:
            import ray

            ray_data = make_data(args.ray_steps)
            uri = write_store(ray_data, f"{tmp}/store")
            ray.init(address="local", num_cpus=2 * os.cpu_count(), include_dashboard=False, log_to_driver=False)
            one = ray_tokens_per_s(uri, 1, args.ray_steps, tmp)
            two = ray_tokens_per_s(uri, 2, args.ray_steps, tmp)
            ray.shutdown()
            print(f"{'prisma-ray train, Ray Train 1 worker':<40} {one:9.0f} tokens/s")
            print(
                f"{'prisma-ray train, Ray Train 2 workers':<40} {two:9.0f} tokens/s  -> scaling {two / one:.2f}x "
                f"on {os.cpu_count()} CPUs"
            )


if __name__ == "__main__":
    main()
