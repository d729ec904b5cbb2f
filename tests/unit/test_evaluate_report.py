"""The leaderboard page and the Pareto plots from a metrics table."""

import re

import pyarrow as pa
import pytest

from prisma_ray.evaluate.report import front_plots, leaderboard_html, plot_name
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
