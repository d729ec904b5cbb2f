"""Evaluation of sparse dictionaries (no Ray in here; `prisma_ray.evaluate.sweep` distributes it).

- `metrics`: MSE, explained variance, cosine, L0, dead/dense fractions, log-density histogram,
  crosscoder decoder-norm shares, Pareto fronts (pure functions and accumulators);
- `splice`: the model run with a dictionary spliced in at its hook point: loss recovered, KL,
  top-1 delta, for classifier and zero-shot heads, transcoders as MLP replacements;
- `ground_truth`: per factor value of the synthetic datasets, the best single latent's AUROC, AP, purity and
  coverage; `baselines`: the same for raw dimensions, PCA, k-means and random directions;
- `checkpoint`: `EvalConfig` and `Evaluator`, one metrics row per checkpoint;
- `discovery`, `results`, `report`: finding checkpoints, resumable result files, leaderboard and plots;
- `cross_model`, `cross_page`: the leaderboard across models and which models' dictionaries share features.
"""

from ..sae.io import CheckpointInfo, read_checkpoint_info
from .checkpoint import EvalConfig, Evaluator, HeadConfig, evaluate_checkpoint
from .discovery import find_checkpoints

__all__ = [
    "CheckpointInfo",
    "EvalConfig",
    "Evaluator",
    "HeadConfig",
    "evaluate_checkpoint",
    "find_checkpoints",
    "read_checkpoint_info",
]
