"""Across models without Ray: the leaderboard across models, which dictionaries are compared, decoder alignment
and co-firing on planted shared features, pooling over different patch grids, and the page on two tiny ViTs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prisma_ray.errors import InvalidRequest
from prisma_ray.evaluate import EvalConfig
from prisma_ray.evaluate.cross_model import (
    cofiring,
    comparable_pairs,
    decoder_alignment,
    image_means,
    leaderboard_across_models,
    pair_order,
    shared_images,
)
from prisma_ray.evaluate.cross_page import pair_rows, write_cross_model_page
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites, export_files, write_files
from tests.tiny_models import tiny_vit
from tests.unit.test_evaluate_checkpoint import extract_in_process, shapes_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def row(model, hook="h", l0=4.0, ev=0.5, **extra):
    base = dict(model=model, hook=hook, l0=l0, explained_variance=ev, kind="sae", architecture="topk", k=4)
    return {"checkpoint": f"{model}/{hook}/{l0}/{ev}", "name": f"n{l0}", "d_in": 32, "d_sae": 64, **base, **extra}


def test_leaderboard_across_models_reads_the_front_at_each_l0_budget():
    rows = [
        row("a", l0=3.0, ev=0.4, loss_recovered=0.2, gt_fraction_detected=0.5, stability=0.6),
        row("a", l0=12.0, ev=0.7, loss_recovered=0.9, gt_fraction_detected=0.25, stability=0.8),
        row("a", l0=50.0, ev=0.6, loss_recovered=None, gt_fraction_detected=None, stability=None),
        row("b", hook="h2", l0=20.0, ev=0.3, loss_recovered=None, gt_fraction_detected=None, stability=None),
    ]
    board = leaderboard_across_models(pa.Table.from_pylist(rows), budgets=[4, 16, 64]).to_pylist()
    assert [(r["model"], r["hook"], r["checkpoints"]) for r in board] == [("a", "h", 3), ("b", "h2", 1)]
    a, b = board
    assert (a["ev_l0_le_4"], a["ev_l0_le_16"], a["ev_l0_le_64"]) == (0.4, 0.7, 0.7)
    assert (a["best_explained_variance"], a["best_ev_l0"], a["best_ev_name"]) == (0.7, 12.0, "n12.0")
    assert a["loss_recovered"] == 0.9 and a["gt_fraction_detected"] == 0.5
    assert a["stability"] == pytest.approx(0.7), "the mean over the rows that have one"
    assert (b["ev_l0_le_4"], b["ev_l0_le_16"], b["ev_l0_le_64"]) == (None, None, 0.3)
    assert b["loss_recovered"] is None and b["stability"] is None
    assert "gt_mean_ap" not in a, "only the ground-truth columns the sweep measured"
    with pytest.raises(InvalidRequest, match=r"no column \['l0'\]"):
        leaderboard_across_models(pa.table({"model": ["a"], "hook": ["h"]}))


def test_pairs_are_across_models_on_the_shared_config_with_the_best_variance():
    rows = [
        row("a", ev=0.5),
        row("a", ev=0.6, l0=8.0),  # same config, better: the one compared
        row("a", ev=0.9, architecture="relu", k=None),  # b has no relu
        row("a", hook="h2", ev=0.1),  # another hook of a: compared with b, never with a's own
        row("b", ev=0.2),
        row("a+b", ev=0.9),  # a crosscoder across models: left out
    ]
    pairs = comparable_pairs(rows)
    assert [(x["model"], x["hook"], x["l0"], y["model"]) for x, y in pairs] == [
        ("a", "h", 8.0, "b"),
        ("a", "h2", 4.0, "b"),
    ]


def test_cofiring_finds_planted_shared_features_and_not_independent_ones():
    rng = np.random.default_rng(0)
    n = 400
    shared = rng.exponential(size=(n, 8)) * (rng.random((n, 8)) < 0.3)  # 8 sparse features of the images
    a = np.concatenate([shared * rng.uniform(0.5, 2, 8), rng.exponential(size=(n, 8)), np.zeros((n, 4))], axis=1)
    b = np.concatenate([rng.exponential(size=(n, 24)), shared[:, ::-1] * 3 + 0.05 * rng.normal(size=(n, 8))], axis=1)
    out = cofiring(a, b)
    assert out["cofire_fraction"] == 0.5, "the 8 planted features of the 16 live latents of A"
    assert out["cofire_live"] == 0.8 and out["cofire_chance"] == 0.0
    assert cofiring(a, rng.exponential(size=(n, 32)))["cofire_fraction"] == 0.0, "independent latents"
    assert cofiring(a, b, threshold=0.05)["cofire_chance"] > 0, "a loose threshold is met by chance too"
    with pytest.raises(InvalidRequest, match=r"same >= 3 inputs, got \[400, 20\] and \[399, 32\]"):
        cofiring(a, b[1:])
    with pytest.raises(InvalidRequest, match="no latent of the first dictionary varies"):
        cofiring(np.ones((5, 3)), b[:5])


def test_images_pool_over_their_patch_tokens_whatever_the_grid():
    rng = np.random.default_rng(1)
    per_image = rng.exponential(size=(6, 3))  # one value per image and feature
    pooled = {}
    for grid in (4, 9):  # two models' patch grids: 2x2 and 3x3 tokens per image
        index = np.repeat(np.arange(6), grid)
        if grid == 9:
            index[index == 5] = -1  # the last image cut short: image_index numbers its rows -1
        x = torch.from_numpy(np.repeat(per_image, grid, axis=0) + 0.01 * rng.normal(size=(6 * grid, 3)))
        means = image_means(index, 6 if grid == 4 else 5, x, lambda t: t * 2, batch=5)
        assert means.shape == (6 if grid == 4 else 5, 3)
        pooled[grid] = ([(f"s{i}", -1) for i in range(len(means))], means)
    assert np.allclose(pooled[4][1], 2 * per_image, atol=0.05)
    a, b = shared_images(pooled[9], pooled[4])
    assert len(a) == 5 and np.allclose(a, b, atol=0.05), "the images both hold, in order"
    with pytest.raises(InvalidRequest, match="no complete image"):
        image_means(np.full(4, -1), 0, torch.zeros(4, 3), lambda t: t, batch=2)


def test_decoder_alignment_matches_shared_directions_and_skips_unrelated_decoders(monkeypatch):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 32))
    shared = decoder_alignment(w, w[rng.permutation(64)] * 2)
    assert shared == pytest.approx({"decoder_matched": 1.0, "decoder_cosine": 1.0, "decoder_bound": 1.0})
    half = decoder_alignment(w, np.concatenate([w[:32], rng.normal(size=(32, 32))]))
    assert half["decoder_matched"] == 0.5 and half["decoder_bound"] == 0.5
    import prisma_ray.evaluate.cross_model as cross_model

    monkeypatch.setattr(cross_model, "matched_fraction", lambda *a: pytest.fail("no matching when none can match"))
    unrelated = decoder_alignment(w, rng.normal(size=(64, 32)))
    assert unrelated == {"decoder_matched": 0.0, "decoder_cosine": None, "decoder_bound": 0.0}
    monkeypatch.undo()
    with pytest.raises(InvalidRequest, match=r"one shape, got \[64, 32\] and \[64, 16\]"):
        decoder_alignment(w, w[:, :16])


class FakeLatents:
    images = 20

    def __init__(self, decoders, pooled):
        self.decoders, self.pooled_ = decoders, pooled

    def release(self, uri):
        pass

    def decoder(self, uri):
        return self.decoders[uri]

    def pooled(self, uri):
        return self.pooled_[uri]


def test_decoder_alignment_of_equal_widths_shared_directions_and_random_ones():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 32))
    rows = [row("a"), row("b"), row("c")]
    images = [(f"s{i}", -1) for i in range(20)]
    acts = rng.exponential(size=(20, 64))
    decoders = {"a/h/4.0/0.5": w, "b/h/4.0/0.5": w[rng.permutation(64)] * 3, "c/h/4.0/0.5": rng.normal(size=(64, 32))}
    pooled = {uri: (images, acts) for uri in decoders}
    pooled["c/h/4.0/0.5"] = (images[:10], acts[:10])
    pairs = {(p["model_a"], p["model_b"]): p for p in pair_rows(rows, FakeLatents(decoders, pooled), min_images=16)}
    assert pairs["a", "b"]["decoder_matched"] == 1.0 and pairs["a", "b"]["decoder_cosine"] == pytest.approx(1.0)
    assert pairs["a", "c"]["decoder_matched"] == 0.0 and pairs["a", "c"]["decoder_bound"] == 0.0, "random 32-d"
    assert pairs["a", "b"]["cofire_fraction"] == 1.0 and pairs["a", "b"]["images"] == 20
    assert pairs["a", "c"]["images"] == 10 and "cofire_fraction" not in pairs["a", "c"]
    assert pairs["a", "c"]["note"] == "10 shared held-out images (< 16): no co-firing"
    decoders["c/h/4.0/0.5"] = w[:, :16]
    pooled["c/h/4.0/0.5"] = "c: no store"
    note = {(p["model_a"], p["model_b"]): p for p in pair_rows(rows, FakeLatents(decoders, pooled))}["a", "c"]["note"]
    assert note == "decoders [64, 32] and [64, 16] differ: no decoder alignment; no co-firing (c: no store)"


def test_pairs_of_one_initialisation_seed_are_flagged():
    """Equal seeds and decoder shapes: one initial decoder, whatever the models; unknown seeds: unknown."""
    rng = np.random.default_rng(6)
    rows = [row("a", seed=0), row("b", seed=0), row("c", seed=1), row("d")]
    decoders = {r["checkpoint"]: rng.normal(size=(64, 32)) for r in rows}
    decoders[row("b")["checkpoint"]] = rng.normal(size=(64, 16))
    pooled = dict.fromkeys(decoders, "no store")
    pairs = {(p["model_a"], p["model_b"]): p for p in pair_rows(rows, FakeLatents(decoders, pooled))}
    assert pairs["a", "c"]["shared_init"] is False and pairs["a", "d"]["shared_init"] is None
    assert "shared_init" not in pairs["a", "b"], "decoders of different shapes start apart"
    decoders[row("b")["checkpoint"]] = decoders[row("a")["checkpoint"]]
    pairs = {(p["model_a"], p["model_b"]): p for p in pair_rows(rows, FakeLatents(decoders, pooled))}
    assert pairs["a", "b"]["shared_init"] is True and pairs["a", "b"]["decoder_matched"] == 1.0


@pytest.mark.parametrize(("n", "budget"), [(12, 3), (12, 100), (7, 1), (2, 2)])
def test_pair_order_compares_every_pair_once_holding_at_most_the_budget(n, budget):
    """Every two of `n` checkpoints of one byte each (plus a few pairs left out), with room for `budget` bytes."""
    pairs = [(f"c{i}", f"c{j}") for i in range(n) for j in range(i + 1, n) if (i + j) % 5]
    steps = pair_order(pairs, {f"c{i}": 1 for i in range(n)}, budget)
    compared, held, peak, loads = [], set(), 0, 0
    for step, what in steps:
        if step == "release":
            held.discard(what)
            continue
        compared.append(what)
        loads += len(set(pairs[what]) - held)
        held |= set(pairs[what])
        peak = max(peak, len(held))
    assert sorted(compared) == list(range(len(pairs))), "each pair once"
    assert peak <= max(budget, 2) and not held
    if budget >= n + 1:
        assert loads == n, "everything fits: each checkpoint read once"


def test_the_cross_model_page_holds_a_bounded_number_of_models_arrays(monkeypatch):
    """Many models: the page's reader holds the decoders and pooled latents of a few dictionaries at a time (the
    budget), not of every model at once; every pair is still measured."""
    import weakref

    from prisma_ray.evaluate import cross_page

    n, d_sae, d_in, images = 12, 64, 32, 20
    alive, peak = set(), [0]

    def track(array):
        token = object()
        alive.add(token)
        weakref.finalize(array, alive.discard, token)
        peak[0] = max(peak[0], len(alive))
        return array

    rng = np.random.default_rng(0)
    keys = [("data", f"s{i}", -1) for i in range(images)]
    monkeypatch.setattr(
        cross_page,
        "read_tensors",
        lambda uri, options: {"W_dec": torch.from_numpy(track(rng.normal(size=(d_sae, d_in))))},
    )
    monkeypatch.setattr(
        cross_page._Latents, "_read", lambda self, uri: (keys, track(rng.exponential(size=(images, d_sae))))
    )
    per_checkpoint = 4 * d_sae * (d_in + images)
    monkeypatch.setattr(cross_page, "MEMORY_BUDGET", 3 * per_checkpoint, raising=False)
    rows = [row(f"m{i:02d}") for i in range(n)]
    latents = cross_page._Latents(EvalConfig(stores="unused"), images)
    pairs = pair_rows(rows, latents)
    assert len(pairs) == n * (n - 1) // 2 and all("cofire_fraction" in p for p in pairs)
    assert peak[0] <= 2 * 3, f"{peak[0]} arrays alive at once: at most 3 dictionaries' (decoder and pooled)"


def test_the_page_of_two_tiny_vits_with_different_patch_grids(tmp_path):
    reg = tiny_vit("test-vit-reg", "vit_small_patch14_reg4_dinov2", "dinov2", image_size=28, patch_size=14)
    hook = "blocks.0.hook_resid_post"
    rows = []
    for model in (tiny_vit(), reg):  # 16 and 4 patch tokens per image, on the same 24 images
        extract_in_process(shapes_config(tmp_path, model=model, hooks=[hook], n=24))
        d = Dictionary(
            DictionaryConfig(architecture="relu", d_sae=64, seed=0),
            Sites(inputs=(Site(name=hook, width=32, model=model["name"]),)),
        )
        uri = str(tmp_path / "ckpts" / model["name"])
        write_files(export_files(d), uri)
        rows.append(row(model["name"], hook=hook, checkpoint=uri, architecture="relu", k=None, seed=0))
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), sweep / "metrics.parquet")
    evaluation = EvalConfig(stores=str(tmp_path / "acts"))
    (sweep / "_sweep.json").write_text(json.dumps(evaluation.model_dump(mode="json", exclude={"storage"})))
    page = write_cross_model_page(str(sweep), min_images=8)  # beside the sweep's leaderboard, as a sweep writes it
    assert page == f"{sweep}/cross_model.html"
    text = (sweep / "cross_model.html").read_text()
    assert "test-vit-tiny" in text and "test-vit-reg" in text and "Pareto fronts per model, side by side" in text
    (pair,) = pq.read_table(sweep / "cross_model_pairs.parquet").to_pylist()
    assert pair["images"] == 24 and pair["note"] == "", "every image complete in both grids"
    assert pair["decoder_matched"] == 1.0, "one seed, one width: the same initial decoder, whatever the model"
    assert pair["shared_init"] is True and "initialised from one seed (1 of the 1 equal-shape pairs" in text
    assert 0 <= pair["cofire_fraction"] <= 1
    assert 0 < pair["cofire_live"] <= 1 and pair["cofire_chance"] <= pair["cofire_fraction"] + 0.2
    board = pq.read_table(sweep / "cross_model.parquet").to_pylist()
    assert [r["model"] for r in board] == ["test-vit-reg", "test-vit-tiny"]
    assert f'<img src="plots/test-vit-tiny__{hook}.png"' in text, "the sweep's own per-model plots"
    assert (sweep / "cross_model_fronts.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h3>Best co-firing fraction over hook points</h3>" in text and "rgba(192,57,43,1.00)'>1.000<" in text
