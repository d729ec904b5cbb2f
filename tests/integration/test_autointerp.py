"""Batch explanation through Ray: bounded requests in flight, resumable results."""

import numpy as np

from prisma_ray.interpret.autointerp.run import ExplainConfig, explain_latents
from prisma_ray.interpret.evidence import LatentEvidence, read_explanations


def evidence(latents) -> list[LatentEvidence]:
    rng = np.random.default_rng(0)
    return [
        LatentEvidence("c", i, rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), rng.random((2, 2, 2)), np.ones(2))
        for i in latents
    ]


def test_ray_batches_are_bounded_and_a_rerun_does_only_the_missing_latents(ray_local, chat_server, tmp_path):
    chat_server.delay = 0.05
    chat_server.reply = lambda request: f"concept {len(request['messages'][0]['content'])}"
    cfg = ExplainConfig(
        explainer="chat",
        chat={"base_url": chat_server.url, "model": "m", "concurrency": 2},
        judge="none",
        similarity=False,
        iou=False,
        batch_size=3,
        resources=dict(actors=2, cpus_per_actor=0.5),
    )
    out = str(tmp_path / "out")
    summary = explain_latents(evidence(range(5)), cfg, out)
    assert summary.explained == 5 and sorted(read_explanations(out)) == list(range(5))
    assert chat_server.max_in_flight <= cfg.resources.actors * cfg.chat.concurrency
    chat_server.requests.clear()
    summary = explain_latents(evidence(range(9)), cfg, out)
    assert summary.explained == 4 and summary.already_done == 5 and len(chat_server.requests) == 4
    assert sorted(read_explanations(out)) == list(range(9))
