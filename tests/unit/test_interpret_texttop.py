"""Top text tokens of multimodal language models (`interpret.texttop`): prompt contexts, exact merging, the
record's bytes, the results table and the dashboard section."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prisma_ray.errors import InvalidRequest
from prisma_ray.interpret.autointerp.run import ExplainConfig, asked_for, run_explain
from prisma_ray.interpret.dashboard import marked_context, shown_latents, write_dashboard
from prisma_ray.interpret.evidence import read_explanations
from prisma_ray.interpret.glue import latent_evidence
from prisma_ray.interpret.results import Results, needed_samples, read_results, text_table, write_results
from prisma_ray.interpret.texttop import PromptTokens, TextTop, prompt_tokens
from prisma_ray.interpret.topk import LatentRecord
from prisma_ray.models import TokenKind, TokenLayout

T, P, N = TokenKind.TEXT, TokenKind.PATCH, TokenKind.NEWLINE


def test_contexts_read_an_image_run_as_one_piece_skip_padding_and_mark_the_token():
    strings = ["<pad>", "u", ":", "<image>", "<image>", "<image>", "H", "i", "!"]
    kinds = np.array([T, T, T, P, N, P, T, T, T])
    mask = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1], bool)
    prompt = prompt_tokens(strings, kinds, mask, window=2)
    assert prompt.positions.tolist() == [1, 2, 6, 7, 8], "text tokens only, padding left out"
    assert prompt.tokens == ["u", ":", "H", "i", "!"]
    assert prompt.contexts[0] == "[[u]]:<image>..."
    assert prompt.contexts[2] == "...:<image>[[H]]i!", "the image run is one piece of the window"
    assert prompt.contexts[4] == "...Hi[[!]]"
    with pytest.raises(ValueError, match="9 strings, 8 kinds"):
        prompt_tokens(strings, kinds[1:], mask)


def prompts_of(n_samples: int, n_tokens: int) -> list[PromptTokens]:
    return [
        PromptTokens(
            np.arange(n_tokens) + 3,
            [f"t{b}.{i}" for i in range(n_tokens)],
            [f"ctx {b} [[t{b}.{i}]]" for i in range(n_tokens)],
        )
        for b in range(n_samples)
    ]


def test_each_latent_keeps_its_best_samples_by_their_most_active_text_token_whatever_the_batches():
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(10)]
    acts = [rng.normal(size=(5, 6)).astype(np.float32) for _ in ids]
    acts[3][:, 0] = -1.0  # sample s03 never fires latent 0
    prompts = prompts_of(10, 5)
    one = TextTop.empty(6, 3).update(ids, acts, prompts)
    parts = [TextTop.empty(6, 3).update(ids[i : i + 3], acts[i : i + 3], prompts[i : i + 3]) for i in (0, 3, 6, 9)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    for name in ("scores", "ids", "positions", "tokens", "contexts"):
        np.testing.assert_array_equal(getattr(one, name), getattr(merged, name))
    for latent in range(6):
        peaks = np.array([a[:, latent].max() for a in acts])
        best = np.argsort(-peaks, kind="stable")[:3]
        assert one.ids[latent].tolist() == [ids[b] for b in best]
        token = [acts[b][:, latent].argmax() for b in best]
        assert one.positions[latent].tolist() == [t + 3 for t in token]
        assert one.contexts[latent].tolist() == [f"ctx {b} [[t{b}.{t}]]" for b, t in zip(best, token)]


def test_samples_that_never_fire_are_not_kept_and_nan_is_refused_naming_the_sample():
    prompts = prompts_of(2, 2)
    top = TextTop.empty(2, 2).update(["a", "b"], [np.full((2, 2), -1.0), np.array([[0.0, 2.0], [0.5, -1]])], prompts)
    assert top.ids.tolist() == [["b", ""], ["b", ""]] and top.positions.tolist() == [[4, -1], [3, -1]]
    assert top.tokens.tolist() == [["t1.1", ""], ["t1.0", ""]]
    assert text_table(top).num_rows == 2
    with pytest.raises(ValueError, match=r"samples \['b'\].*NaN"):
        TextTop.empty(2, 2).update(["a", "b"], [np.ones((2, 2)), np.array([[np.nan, 1.0], [0, 0]])], prompts)
    with pytest.raises(ValueError, match="sample 'a': text-token latents \\[3, 2\\], expected \\[2 text tokens"):
        TextTop.empty(2, 2).update(["a"], [np.ones((3, 2))], prompts[:1])


def test_a_records_text_tokens_travel_in_its_bytes_and_merge_with_it():
    rng = np.random.default_rng(1)
    record = LatentRecord.empty(4, 3, k=2, reservoir=2, negatives=1, text=True)
    ids = np.array(["x", "y"])
    record = record.update(ids, rng.random((2, 3, 4)), np.full(3, P)).update_text(
        ids, [rng.random((2, 4)), rng.random((2, 4))], prompts_of(2, 2)
    )
    back = LatentRecord.from_bytes(record.to_bytes())
    np.testing.assert_array_equal(back.text.contexts, record.text.contexts)
    np.testing.assert_array_equal(back.text.scores, record.text.scores)
    assert LatentRecord.from_bytes(LatentRecord.empty(4, 3).to_bytes()).text is None, "vision records have none"
    with pytest.raises(ValueError, match="token kinds"):
        record.merge(LatentRecord.empty(4, 3, k=2, reservoir=2, negatives=1))
    with pytest.raises(ValueError, match="keeps no text tokens"):
        LatentRecord.empty(4, 3).update_text(ids, [], [])


def test_the_dashboard_marks_the_token_in_its_escaped_context():
    assert marked_context("a <b> [[c&d]] e") == "a &lt;b&gt; <mark>c&amp;d</mark> e"


def test_a_latent_that_fires_only_on_text_tokens_has_a_dashboard_page():
    """Latent 1 never fires on an image token but has top text tokens: it is shown (and counted as fired)."""
    prompts = prompts_of(1, 2)
    top = TextTop.empty(3, 1).update(["a"], [np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])], prompts)
    latents = pa.table({"latent": [0, 1, 2], "frequency": [0.1, 0.0, 0.0]})
    empty = pa.table({"latent": pa.array([], pa.int64())})
    results = Results(uri="", summary={}, latents=latents, top=empty, reservoir=empty, text=text_table(top))
    assert shown_latents(results) == [0, 1]
    assert shown_latents(results, 1) == [0]


@pytest.fixture
def text_only_results(tmp_path) -> Results:
    """Results on disk of 3 latents and 2 samples: latent 0 fires on an image token, latent 1 on text tokens
    only, latent 2 never."""
    layout, ids = TokenLayout(prefix=(), grid=(2, 2)), np.array(["a", "b"])
    acts = np.zeros((2, 4, 3), np.float32)
    acts[:, 1, 0] = [1.0, 2.0]
    text = [np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])]
    record = LatentRecord.empty(3, 4, k=2, reservoir=2, negatives=1, text=True).update(ids, acts, layout.kinds())
    record = record.update_text(ids, text, prompts_of(2, 2))
    crops = {s: np.full((8, 8, 3), 200, np.uint8) for s in needed_samples(record)}
    description = {"model": "m", "hook": "lm.blocks.0.hook_resid_post", "checkpoint": "ck"}
    write_results(str(tmp_path / "res"), record, layout, {**description, "token_layout": layout.model_dump()}, crops)
    return read_results(str(tmp_path / "res"))


def test_a_text_only_latents_evidence_holds_its_text_contexts_and_no_images(text_only_results):
    evidence = latent_evidence(text_only_results, 1)
    assert evidence.text_only and evidence.maps.shape == (0, 2, 2)
    assert evidence.texts == ("ctx 1 [[t1.1]]", "ctx 0 [[t0.0]]"), "best first"
    assert not latent_evidence(text_only_results, 0).text_only and latent_evidence(text_only_results, 2) is None


def test_a_text_only_latents_page_says_it_fires_on_text_tokens_only(text_only_results, tmp_path):
    write_dashboard(text_only_results, str(tmp_path / "site"))
    page = (tmp_path / "site" / "latents" / "1.html").read_text()
    assert "never fired" not in page and "fires on text tokens only" in page
    assert "top text tokens of 2 samples (activation 3 to 5" in page and "0.00% of image tokens" in page
    assert "<svg" in (tmp_path / "site" / "latents" / "0.html").read_text(), "an image latent keeps its histogram"


def test_the_chat_explainer_explains_text_only_latents_from_their_text_contexts(text_only_results, chat_server):
    chat_server.reply = lambda request: "boat" if len(request["messages"][0]["content"]) == 2 else "circle"
    cfg = ExplainConfig(
        evidence=text_only_results.uri,
        explainer="chat",
        chat={"base_url": chat_server.url, "model": "m", "backoff_s": 0.01},
        judge="none",
        similarity=False,
        use_ray=False,
    )
    assert run_explain(cfg).explained == 2
    records = read_explanations(text_only_results.uri)
    assert sorted(records) == [0, 1] and records[1].explanation == "boat" and records[0].explanation == "circle"
    assert records[1].scores == {}, "every score reads the top images"


def test_the_dashboard_shows_its_progress_over_the_latents(text_only_results, tmp_path, capsys):
    """A dashboard of thousands of latents takes minutes: it says how many pages it renders and counts them."""
    write_dashboard(text_only_results, str(tmp_path / "site"), progress=True)
    err = capsys.readouterr().err
    assert "dashboard: 100%" in err and "2/2" in err, err


def test_latents_asked_for_outside_the_dictionary_are_refused_and_unfired_ones_named(text_only_results, caplog):
    """`prisma-ray explain --set latents=[0,1,2,3,5,99999]` on a 768-latent dictionary explained five latents and
    dropped 99999 without a word; latents that never fired were dropped the same way."""
    cfg = ExplainConfig(evidence=text_only_results.uri, latents=[0, 3, 99999], use_ray=False)
    with pytest.raises(InvalidRequest, match=r"latents: \[3, 99999\] are not latents of .*res.* 3 latents \(0-2\)"):
        run_explain(cfg)
    assert not (Path(text_only_results.uri) / "explanations.jsonl").exists()
    asked_for([0, 2], text_only_results.fired_latents(), 3, "res")
    assert "latent 2 never fired in res: nothing to explain" in caplog.text
