"""One decode-to-input path: every stage feeds a vision model the same pixels for the same sample.

Extraction, interpretation, the vision spliced-in evaluation and steering each run the model; the
input of every forward pass is captured (`HookedVisionModel.check_input`, which every forward calls)
and compared exactly. The analysis inputs of the same files are compared too.
"""

import pytest
import torch

from prisma_ray.data.shards import decode_shard, plan_shards
from prisma_ray.data.sources import list_refs
from prisma_ray.evaluate import Evaluator
from prisma_ray.interpret.collect import InterpretConfig, LatentWorker, plan_interpret
from prisma_ray.interpret.steer import SteerConfig, SteerSpec, run_steer
from prisma_ray.models import HookedVisionModel, ModelEntry
from prisma_ray.models.loading import load_model
from prisma_ray.sae import Sites
from tests.unit.test_evaluate_checkpoint import (
    HOOKS,
    TINY_VIT,
    eval_config,
    extract_in_process,
    identity,
    save,
    shapes_config,
    site,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N = 10


def first_pass(inputs: list[torch.Tensor], n: int = N) -> torch.Tensor:
    """The first `n` samples a stage showed the model, in order (later passes rerun the same inputs)."""
    rows, seen = [], 0
    for x in inputs:
        rows.append(x)
        seen += len(x)
        if seen >= n:
            break
    return torch.cat(rows)[:n]


def test_every_stage_feeds_the_model_the_same_pixels(tmp_path, monkeypatch):
    from prisma_ray.analysis.inputs import InputsConfig, load_inputs

    seen: dict[str, list[torch.Tensor]] = {}
    stage = ["extract"]
    check_input = HookedVisionModel.check_input

    def record(self, x):
        seen.setdefault(stage[0], []).append(x.detach().cpu().clone())
        check_input(self, x)

    monkeypatch.setattr(HookedVisionModel, "check_input", record)
    # 40x40 images: the model (32 px, crop_pct 0.9) resizes them to 35 and centre-crops
    dataset = dict(
        type="synthetic", uri=str(tmp_path / "shapes"), generator=dict(name="shapes", n_images=N, image_size=40)
    )
    cfg = shapes_config(tmp_path, hooks=[HOOKS[0]], dataset=dataset)
    extract_in_process(cfg)
    checkpoint = save(identity(Sites(inputs=(site(HOOKS[0]),))), tmp_path / "sae")
    entry = ModelEntry(**TINY_VIT)

    stage[0] = "interpret"
    plan = plan_interpret(
        InterpretConfig(
            checkpoint=checkpoint,
            dataset=cfg.dataset,
            output=str(tmp_path / "interpret"),
            model=entry,
            pretrained=False,
            shard_size=6,
            batch_size=4,
        )
    )
    worker = LatentWorker(plan.job())
    for refs in plan_shards(list_refs(plan.spec), plan.spec, plan.cfg.shard_size):
        worker.process(decode_shard(refs, plan.spec, plan.fmt))

    stage[0] = "evaluate"
    row = Evaluator(eval_config(tmp_path, splice_samples=N, splice_batch_size=4)).evaluate(checkpoint)
    assert row["splice_samples"] == N and row["label_source"] == "dataset"

    stage[0] = "steer"
    steer_cfg = SteerConfig(
        checkpoint=checkpoint,
        steer=SteerSpec(latents=[0], scale=1.0),
        dataset=cfg.dataset,
        samples=N,
        model=entry,
        pretrained=False,
    )
    assert run_steer(steer_cfg)["inputs"] == N

    reference = first_pass(seen["extract"])
    assert reference.shape == (N, 3, 32, 32) and reference.dtype == torch.float32
    for name in ("interpret", "evaluate", "steer"):
        assert torch.equal(first_pass(seen[name]), reference), f"{name} feeds the model other pixels than extraction"
    files = [str(tmp_path / "shapes" / r.sample_id) for r in sorted(list_refs(plan.spec), key=lambda r: r.sample_id)]
    analysis = load_inputs(load_model(entry, False, seed=0), InputsConfig(uris=files))
    assert torch.equal(analysis.x, reference), "analysis builds other pixels from the same files"
