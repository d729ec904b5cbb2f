"""The OpenAI-compatible chat client and the chat explainer, against a scripted server on 127.0.0.1."""

import base64
import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

from prisma_ray.interpret.autointerp.chat import ChatClient, ChatConfig, ChatError
from prisma_ray.interpret.autointerp.explainers import ChatExplainer
from prisma_ray.interpret.autointerp.scoring import ChatJudge
from prisma_ray.interpret.evidence import LatentEvidence


def config(server, **kw) -> ChatConfig:
    return ChatConfig(
        **{"base_url": server.url, "model": "test-vlm", "backoff_s": 0.01, "max_retries": 3, "timeout_s": 5.0, **kw}
    )


def evidence(n: int = 3, latent: int = 7) -> LatentEvidence:
    rng = np.random.default_rng(latent)
    maps = rng.random((n, 4, 4)).astype(np.float32)
    return LatentEvidence("ckpt", latent, rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), maps, maps.max((1, 2)))


def test_explainer_request_has_model_auth_prompt_and_png_data_url_images(chat_server, monkeypatch):
    monkeypatch.setenv("TEST_VLM_KEY", "sk-secret")
    chat_server.reply = lambda request: "Red circles.\nThey are round."
    explainer = ChatExplainer(ChatClient(config(chat_server, api_key_env="TEST_VLM_KEY")), max_images=2)
    explanation = explainer.explain(evidence(3))
    assert explanation.text == "Red circles" and explanation.explainer == "chat:test-vlm"
    assert explanation.raw == "Red circles.\nThey are round."
    [request] = chat_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-secret"
    body = request["json"]
    assert body["model"] == "test-vlm" and body["max_tokens"] == 64
    [message] = body["messages"]
    assert message["role"] == "user" and message["content"][0]["type"] == "text"
    images = message["content"][1:]
    assert len(images) == 2, "max_images top images are sent"
    for part in images:
        assert part["type"] == "image_url"
        prefix, data = part["image_url"]["url"].split(",", 1)
        assert prefix == "data:image/png;base64"
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and image.size == (16, 16)


def test_retries_429_and_500_then_succeeds(chat_server):
    chat_server.script = [429, 500, 503]
    assert ChatClient(config(chat_server)).complete([{"role": "user", "content": "hi"}]) == "red circle"
    assert len(chat_server.requests) == 4


def test_gives_up_after_max_retries_with_a_clear_error(chat_server):
    chat_server.script = [500] * 10
    with pytest.raises(ChatError, match=r"gave up after 3 attempts.*HTTP 500"):
        ChatClient(config(chat_server, max_retries=2)).complete([])
    assert len(chat_server.requests) == 3


def test_other_4xx_fails_at_once(chat_server):
    chat_server.script = [400]
    with pytest.raises(ChatError, match="HTTP 400 .not retried"):
        ChatClient(config(chat_server)).complete([])
    assert len(chat_server.requests) == 1


def test_malformed_response_names_the_endpoint(chat_server):
    chat_server.script = ["malformed"]
    with pytest.raises(ChatError, match=r"/v1/chat/completions: malformed chat completion"):
        ChatClient(config(chat_server)).complete([])


def test_timeout_is_retried_then_succeeds(chat_server):
    chat_server.script = [("sleep", 1.0)]
    start = time.perf_counter()
    assert ChatClient(config(chat_server, timeout_s=0.2)).complete([]) == "red circle"
    assert time.perf_counter() - start < 1.0 and len(chat_server.requests) == 2


def test_unreachable_endpoint_and_missing_key_are_clear_errors(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ChatConfig(base_url=f"http://127.0.0.1:{port}/v1", backoff_s=0.0, max_retries=1)
    with pytest.raises(ChatError, match=rf"127.0.0.1:{port}/v1/chat/completions: gave up after 2 attempts"):
        ChatClient(cfg).complete([])
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ChatError, match="NO_SUCH_KEY"):
        ChatClient(cfg.model_copy(update={"api_key_env": "NO_SUCH_KEY"}))


def test_concurrency_is_bounded(chat_server):
    chat_server.delay = 0.1
    client = ChatClient(config(chat_server, concurrency=3))
    answers = list(client.map(lambda i: client.complete([{"role": "user", "content": str(i)}]), range(9)))
    assert answers == ["red circle"] * 9
    assert chat_server.max_in_flight == 3


def test_chat_judge_asks_yes_or_no_per_image(chat_server):
    chat_server.reply = lambda request: "Yes." if "0" in request["messages"][0]["content"][0]["text"] else "no"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    assert ChatJudge(ChatClient(config(chat_server)), prompt="{text} 1?").judge("x", images).tolist() == [False] * 4
    assert ChatJudge(ChatClient(config(chat_server)), prompt="{text} 0?").judge("x", images).tolist() == [True] * 4
    assert len(chat_server.requests) == 8


def test_an_lmm_latents_explainer_request_shows_image_regions_then_text_contexts_each_named(chat_server):
    chat_server.reply = lambda request: "paddling a canoe"
    texts = ("user:<image>What is the man [[doing]]?assistant:", "user:<image>Describe the [[boat]].assistant:")
    lmm = LatentEvidence(**{**evidence(3).__dict__, "texts": texts})
    explainer = ChatExplainer(ChatClient(config(chat_server)), max_images=2, max_texts=1)
    assert explainer.explain(lmm).text == "paddling a canoe"
    [part_prompt, part_images, *images, part_texts] = chat_server.requests[0]["json"]["messages"][0]["content"]
    assert "multimodal language model" in part_prompt["text"] and "[[like this]]" in part_prompt["text"]
    assert "2 images" in part_prompt["text"] and "1 text contexts" in part_prompt["text"]
    assert part_images["text"].startswith("Image regions") and [p["type"] for p in images] == ["image_url"] * 2
    assert part_texts["type"] == "text" and part_texts["text"].startswith("Text contexts")
    assert part_texts["text"].endswith("\n1. " + texts[0]), "the best context, numbered; max_texts of them"
    plain = explainer.messages(evidence(3))[0]["content"]
    assert [p["type"] for p in plain] == ["text", "image_url", "image_url"], "no text part without text contexts"
    assert "Text contexts" not in plain[0]["text"]


def test_a_text_only_latents_request_has_its_text_contexts_and_says_there_are_no_image_regions(chat_server):
    chat_server.reply = lambda request: "question words"
    none = (np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 4, 4), np.float32), np.zeros(0, np.float32))
    texts = ("user:<image>[[What]] is it?assistant:", "user:<image>[[Where]] is it?assistant:")
    explainer = ChatExplainer(ChatClient(config(chat_server)), max_texts=1)
    assert explainer.explain(LatentEvidence("ckpt", 5, *none, texts=texts)).text == "question words"
    [prompt, part_texts] = chat_server.requests[0]["json"]["messages"][0]["content"]
    assert "text tokens only" in prompt["text"] and "no image regions" in prompt["text"]
    assert "1 text contexts" in prompt["text"] and "[[like this]]" in prompt["text"]
    assert part_texts["text"].startswith("Text contexts") and part_texts["text"].endswith("\n1. " + texts[0])
