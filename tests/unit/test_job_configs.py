"""Every example job config under jobs/ validates against the config its job reads."""

from pathlib import Path

import pytest

from prisma_ray.config import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _config_class(path: Path):
    from prisma_ray.evaluate.sweep import SweepConfig
    from prisma_ray.train.config import TrainConfig

    return {"train_sae.yaml": TrainConfig, "sweep_checkpoints.yaml": SweepConfig}[path.name]


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_validates(path):
    assert load_config(_config_class(path), path) is not None
