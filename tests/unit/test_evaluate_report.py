"""The leaderboard page and the Pareto plots from a metrics table."""

import re

import pyarrow as pa
import pytest

from prisma_ray.evaluate.report import best_ground_truth, front_plots, ground_truth_line, leaderboard_html, plot_name
from prisma_ray.evaluate.results import ResultStore, result_key

ROWS = [
    {
        "model": "m1",
        "hook": "blocks.0.hook_resid_post",
        "name": "a<b",
        "architecture": "topk",
        "l0": 4.0,
        "explained_variance": 0.8,
        "loss_recovered": 0.9,
        "checkpoint": "/c/a",
    },
    {
        "model": "m1",
        "hook": "blocks.0.hook_resid_post",
        "name": "b",
        "architecture": "relu",
        "l0": 8.0,
        "explained_variance": 0.7,
        "loss_recovered": None,
        "checkpoint": "/c/b",
    },
    {
        "model": "m2",
        "hook": "blocks.1.hook_mlp_out",
        "name": "c",
        "architecture": "topk",
        "l0": 2.0,
        "explained_variance": 0.5,
        "loss_recovered": None,
        "checkpoint": "/c/c",
    },
]


def test_leaderboard_is_sortable_escaped_and_links_plots():
    page = leaderboard_html(pa.Table.from_pylist(ROWS), ["plots/x.png"])
    assert page.count("<tr>") == 4 and "a&lt;b" in page and "a<b" not in page
    assert 'addEventListener("click"' in page and '<img src="plots/x.png"' in page
    headers = re.findall(r"<th>([^<]+)</th>", page)
    assert headers[:4] == ["model", "hook", "name", "architecture"] and "checkpoint" in headers
    assert 'data-v="0.8">0.8<' in page and 'data-v=""></td>' in page, "numbers sort by value, missing ones are empty"


def test_front_plots_one_png_per_model_and_hook():
    plots = front_plots(pa.Table.from_pylist(ROWS))
    assert sorted(plots) == [plot_name("m1", "blocks.0.hook_resid_post"), plot_name("m2", "blocks.1.hook_mlp_out")]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in plots.values())
    assert plot_name("org/model:x", "h") == "org_model_x__h.png"


def test_result_store_round_trip_and_refuses_another_config(tmp_path):
    results = ResultStore(str(tmp_path / "out"))
    results.claim({"split": "test", "max_tokens": 10})
    results.claim({"max_tokens": 10, "split": "test"})
    for row in ROWS:
        results.write(row)
    assert results.done() == {result_key(r["checkpoint"]) for r in ROWS}
    table = results.table()
    assert table.column("checkpoint").to_pylist() == ["/c/a", "/c/b", "/c/c"]
    assert table.column("loss_recovered").to_pylist() == [0.9, None, None]
    with pytest.raises(ValueError, match="changed: split"):
        results.claim({"split": "val", "max_tokens": 10})


def test_the_leaderboard_and_the_summary_line_give_the_margin_over_the_best_baseline():
    truth = {
        "gt_fraction_detected": 0.5,
        "gt_mean_best_auroc": 0.912,
        "gt_best_baseline": "raw",
        "gt_baseline_fraction_detected": 0.75,
        "gt_baseline_mean_best_auroc": 0.904,
        "gt_margin_auroc": 0.008,
        "gt_margin_detected": -0.25,
    }
    rows = [{**ROWS[0], **truth}, {**ROWS[1], "gt_fraction_detected": 0.5, "gt_mean_best_auroc": 0.8}, ROWS[2]]
    headers = re.findall(r"<th>([^<]+)</th>", leaderboard_html(pa.Table.from_pylist(rows), []))
    assert {"gt_best_baseline", "gt_margin_auroc", "gt_margin_detected"} <= set(headers)
    best = best_ground_truth(rows)
    assert best["name"] == "a<b", "the most values detected, then the highest mean best AUROC"
    assert ground_truth_line(best) == (
        "m1 a<b detects 0.500 of the factor values (AUROC >= 0.95), mean best AUROC 0.912; "
        "baselines: mean best AUROC 0.904 (raw), detected 0.750 (margin +0.008 AUROC, -0.250 detected)"
    )
    assert ground_truth_line(rows[1], 0.9).endswith("(AUROC >= 0.9), mean best AUROC 0.800"), "no baselines"
    assert best_ground_truth([ROWS[2]]) is None


def test_a_report_writes_the_page_across_models_only_when_asked(tmp_path, monkeypatch):
    """A campaign's per-model sweep wrote the cross-model page (every pair of models compared) for each model in
    turn: quadratic in the models (the registry pass spent ~130 s per model in it by its 47th model)."""
    from prisma_ray.evaluate import sweep

    pages = []
    monkeypatch.setattr(sweep, "write_cross_model_page", lambda uri, evaluation=None: pages.append(uri) or uri + "/x")
    results = ResultStore(str(tmp_path / "out"))
    results.claim({"split": "test"})
    for row in ROWS:  # two models
        results.write(row)
    assert sweep.write_report(results, cross_model=False)["cross_model"] == "" and pages == []
    assert sweep.write_report(results)["cross_model"] == results.uri + "/x" and pages == [results.uri]


def test_a_report_redraws_only_the_plots_of_the_models_it_evaluated_and_those_missing(tmp_path, monkeypatch):
    """Each model's sweep in a campaign redrew every model's plots (quadratic in the models): a report now draws the
    plots of `redraw`'s models and any missing one, and links every model's."""
    from prisma_ray.evaluate import report, sweep

    drawn = []
    real = report.front_plots
    monkeypatch.setattr(sweep, "front_plots", lambda table, only=None: drawn.append(only) or real(table, only))
    results = ResultStore(str(tmp_path / "out"))
    results.claim({"split": "test"})
    for row in ROWS:
        results.write(row)
    m1, m2 = plot_name("m1", "blocks.0.hook_resid_post"), plot_name("m2", "blocks.1.hook_mlp_out")
    first = sweep.write_report(results, cross_model=False, redraw={"m1"})
    assert drawn[-1] == [("m1", "blocks.0.hook_resid_post"), ("m2", "blocks.1.hook_mlp_out")], "m2's is missing"
    assert sorted(p.rsplit("/", 1)[1] for p in first["plots"]) == [m1, m2]
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == [m1, m2]
    second = sweep.write_report(results, cross_model=False, redraw={"m2"})
    assert drawn[-1] == [("m2", "blocks.1.hook_mlp_out")] and second["plots"] == first["plots"]
    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert f'src="plots/{m1}"' in page and f'src="plots/{m2}"' in page, "the page links every model's plot"
