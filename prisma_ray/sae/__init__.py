"""Sparse dictionaries (SAEs, transcoders, crosscoders): variants, losses, init, the per-step
trainer and SAELens-format checkpoints. No Ray in here; `prisma_ray.train` distributes it."""

from .config import DictionaryConfig
from .dictionary import Dictionary, Site, Sites
from .io import CheckpointInfo, export_files, load_dictionary, load_sparsity, read_checkpoint_info, write_files
from .trainer import Normalization, Trainer

__all__ = [
    "CheckpointInfo",
    "Dictionary",
    "DictionaryConfig",
    "Normalization",
    "Site",
    "Sites",
    "Trainer",
    "export_files",
    "load_dictionary",
    "load_sparsity",
    "read_checkpoint_info",
    "write_files",
]
