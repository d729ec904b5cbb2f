"""Every example job config under jobs/ validates against the config its job reads."""

from pathlib import Path

import pytest

from prisma_ray.config import load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _config_class(path: Path):
    from prisma_ray.campaign import CampaignConfig
    from prisma_ray.evaluate.sweep import SweepConfig
    from prisma_ray.train.config import TrainConfig

    return {"train_sae.yaml": TrainConfig, "sweep_checkpoints.yaml": SweepConfig, "campaign.yaml": CampaignConfig}[
        path.name
    ]


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_validates(path):
    assert load_config(_config_class(path), path) is not None


def _config_classes():
    """Every pydantic model a job reads: the configs of the `prisma-ray` commands and the models nested in them."""
    from prisma_ray.cli import COMMANDS, _resolve
    from prisma_ray.config import config_models

    found = {}
    for command in COMMANDS:
        if command.config:
            found.update(dict.fromkeys(config_models(_resolve(command.config))))
    return list(found)


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_config_model_refuses_unknown_keys_and_describes_every_field(cls):
    assert cls.model_config.get("extra") == "forbid", f"{cls.__name__} accepts unknown keys"
    undescribed = [name for name, info in cls.model_fields.items() if not info.description]
    assert not undescribed, f"{cls.__name__}: fields without a description: {undescribed}"
