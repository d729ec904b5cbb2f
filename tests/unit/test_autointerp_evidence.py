"""Evidence records, explanations.jsonl, masking, scorers and the resumable batch run (no Ray)."""

import numpy as np
import pytest

from prisma_ray.interpret.autointerp.embedders import PrototypeEmbedder, UnknownConcept, named_labels, unit
from prisma_ray.interpret.autointerp.explainers import NO_IMAGE_LABEL, VocabularyExplainer
from prisma_ray.interpret.autointerp.run import ExplainConfig, Pipeline, explain_latents
from prisma_ray.interpret.autointerp.scoring import (
    EmbeddingJudge,
    GroundTruthSegmenter,
    Scorers,
    balanced_accuracy,
    iou,
    random_baseline,
)
from prisma_ray.interpret.evidence import (
    Explanation,
    ExplanationRecord,
    LatentEvidence,
    Score,
    active_mask,
    append_explanations,
    mask_images,
    read_explanations,
    upsample,
)


def coloured(colour: tuple[int, int, int], n: int, size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (n, size, size, 3)).copy()


class MeanColour:
    """Image features: the mean RGB of the bright pixels, or of the pixels of a region (a stand-in for a model)."""

    def __call__(self, images: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        x = images.reshape(len(images), -1, 3).astype(np.float64)
        if regions is None:
            return x.sum(1) / np.maximum((x.sum(-1) > 100).sum(1, keepdims=True), 1)
        keep = (regions if regions.shape[1:] == images.shape[1:3] else upsample(regions, images.shape[1:3])).reshape(
            len(images), -1, 1
        )
        return (x * keep).sum(1) / np.maximum(keep.sum(1), 1)


def test_evidence_validates_shapes_and_names_the_latent():
    images, maps = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2, 2))
    with pytest.raises(ValueError, match="latent 3 of 'c'.*images must be uint8"):
        LatentEvidence("c", 3, images.astype(np.float32), maps, np.zeros(2))
    with pytest.raises(ValueError, match="maps must be float\\[2, h, w\\]"):
        LatentEvidence("c", 3, images, maps[:1], np.zeros(2))
    with pytest.raises(ValueError, match="concept_masks\\['red'\\] must be bool"):
        LatentEvidence("c", 3, images, maps, np.zeros(2), concept_masks={"red": np.zeros((2, 8, 8), np.uint8)})


def test_mask_images_keeps_active_patches_and_dims_the_rest():
    images = np.full((1, 4, 4, 3), 200, np.uint8)
    maps = np.array([[[1.0, 0.0], [0.1, 0.0]]])
    shown = mask_images(images, maps, threshold=0.5, dim=0.25)
    assert (shown[0, :2, :2] == 200).all() and (shown[0, 2:] == 50).all() and (shown[0, :2, 2:] == 50).all()
    assert (mask_images(images, maps, mode="mask")[0, 2:] == 0).all()
    assert active_mask(np.zeros((1, 2, 2)), (4, 4)).sum() == 0, "a latent that does not fire shows nothing"
    with pytest.raises(ValueError, match="mode must be"):
        mask_images(images, maps, mode="blur")


def test_explanations_jsonl_appends_atomically_and_reports_bad_lines(tmp_path):
    out = str(tmp_path / "out")
    assert read_explanations(out) == {}
    first = ExplanationRecord.of(
        Explanation(latent=1, text="red", explainer="v"), [Score(name="iou", value=0.5, baseline=0.1)]
    )
    append_explanations(out, [first])
    append_explanations(out, [ExplanationRecord(latent=2, explanation="star", explainer="v")])
    records = read_explanations(out)
    assert sorted(records) == [1, 2] and records[1].scores == {"iou": 0.5, "iou_baseline": 0.1}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
    (tmp_path / "out" / "explanations.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="explanations.jsonl, line 1: not an explanation record"):
        read_explanations(out)


def test_a_text_only_latent_has_evidence_without_images_no_image_scores_and_no_vocabulary_label():
    """A multimodal language model's latent that fired on text tokens only: texts but no top images."""
    none = (np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 2, 2), np.float32), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="latent 3 of 'c': no top images and no text contexts"):
        LatentEvidence("c", 3, *none)
    evidence = LatentEvidence("c", 3, *none, negatives=coloured((0, 0, 255), 2), texts=("a [[boat]]",))
    assert (
        evidence.text_only
        and not LatentEvidence("c", 3, coloured((255, 0, 0), 1), np.ones((1, 2, 2)), np.ones(1)).text_only
    )
    embedder = PrototypeEmbedder(MeanColour(), {"red": coloured((255, 0, 0), 2), "blue": coloured((0, 0, 255), 2)})
    scorers = Scorers(judge=EmbeddingJudge(embedder), segmenter=GroundTruthSegmenter(), embedder=embedder)
    assert scorers.score(evidence, Explanation(latent=3, text="red", explainer="t"), "blue") == []
    explanation = VocabularyExplainer(embedder, ["red", "blue"]).explain(evidence)
    assert explanation.text == NO_IMAGE_LABEL and "text tokens only" in explanation.text


def test_scores_detection_iou_similarity_against_a_baseline():
    red, blue = coloured((255, 0, 0), 4), coloured((0, 0, 255), 4)
    embedder = PrototypeEmbedder(MeanColour(), {"red": red, "blue": blue, "green": coloured((0, 255, 0), 4)})
    maps = np.zeros((4, 2, 2))
    maps[:, 0, 0] = 1.0
    masks = np.zeros((4, 8, 8), bool)
    masks[:, :4, :4] = True
    evidence = LatentEvidence(
        "c", 0, red, maps, np.ones(4), negatives=blue, concept_masks={"red": masks, "blue": ~masks}
    )
    scorers = Scorers(judge=EmbeddingJudge(embedder), segmenter=GroundTruthSegmenter(), embedder=embedder)
    scores = {s.name: s for s in scorers.score(evidence, Explanation(latent=0, text="red", explainer="t"), "blue")}
    assert scores["detection"].value == 1.0 and scores["detection"].baseline == 0.0
    assert scores["iou"].value == 1.0 and scores["iou"].baseline == 0.0
    assert scores["similarity"].value > 0.5 > scores["similarity"].baseline
    text_scores = scorers.score(evidence, Explanation(latent=0, text="something else", explainer="t"), None)
    assert {s.name for s in text_scores} == {"iou"}, "an unembeddable text and no baseline leave those scores out"


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COLOURS |= {"magenta": (255, 0, 255), "cyan": (0, 255, 255)}


def test_vocabulary_explainer_names_the_colour_of_the_highlighted_region_for_every_colour():
    """Each latent fires on one patch of a 4x4 grid whose other patches hold the other colours: the label must
    come from the highlighted patch (the rest of the image, dimmed or not, points elsewhere)."""
    names = list(COLOURS)
    embedder = PrototypeEmbedder(MeanColour(), {name: coloured(rgb, 4) for name, rgb in COLOURS.items()})
    explainer = VocabularyExplainer(embedder, names)
    maps = np.zeros((3, 4, 4))
    maps[:, 0, 0] = 1.0
    labels = []
    for k, name in enumerate(names):
        images = np.zeros((3, 16, 16, 3), np.uint8)
        for i in range(3):
            for p in range(16):
                colour = COLOURS[name] if p == 0 else COLOURS[names[(k + 1 + (i + p) % 5) % len(names)]]
                images[i, 4 * (p // 4) : 4 * (p // 4) + 4, 4 * (p % 4) : 4 * (p % 4) + 4] = colour
        labels.append(explainer.explain(LatentEvidence("c", k, images, maps, np.ones(3))).text)
    assert labels == names, "one label per colour, each the highlighted one (no collapse onto one label)"


class TableEmbedder:
    """Texts: one axis per label. Images: the row of `vectors` that the first pixel's red value indexes."""

    def __init__(self, labels: list[str], vectors: np.ndarray):
        self.labels, self.vectors = labels, vectors

    def embed_texts(self, texts):
        return np.eye(len(self.labels), dtype=np.float32)[[self.labels.index(t) for t in texts]]

    def embed_regions(self, images, regions):
        return unit(self.vectors[images[:, 0, 0, 0]])


def test_vocabulary_explainer_calibrates_hub_labels_and_names_one_value_per_factor():
    labels = ["circle", "star", "red", "blue"]
    rng = np.random.default_rng(0)
    # a hub: every reference image is close to "star", whatever it shows
    reference = unit(np.array([0.3, 0.8, 0.3, 0.3]) + 0.1 * rng.normal(size=(200, 4)))
    vectors = np.array([[0.1, 0.75, 0.6, 0.1], [0.9, 0.1, 0.1, 0.9], [0.3, 0.3, 0.3, 0.9], [0.9, 0.3, 0.3, 0.3]])

    def explain(explainer, row):
        images = np.full((1, 4, 4, 3), row, np.uint8)
        return explainer.explain(LatentEvidence("c", row, images, np.ones((1, 2, 2)), np.ones(1))).text

    embedder = TableEmbedder(labels, vectors)
    groups = [["circle", "star"], ["red", "blue"]]
    plain = VocabularyExplainer(embedder, labels, groups=groups)
    calibrated = VocabularyExplainer(embedder, labels, groups=groups, reference=reference)
    assert explain(plain, 0) == "star", "uncalibrated, the hub wins where the region is red"
    assert explain(calibrated, 0) == "red"
    assert explain(calibrated, 1) == "blue circle", "both factors fit: a colour and a shape, the colour first"
    assert explain(calibrated, 2) == "blue" and explain(calibrated, 3) == "circle"
    with pytest.raises(ValueError, match="groups must hold every vocabulary label exactly once"):
        VocabularyExplainer(embedder, labels, groups=[["circle", "star"], ["red"]])


def test_scoring_helpers():
    assert balanced_accuracy([1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]) == 0.75
    assert iou(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool)) == pytest.approx(1 / 3)
    assert iou(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    assert named_labels("Red Circles and a star", ["red", "circle", "star", "cross"]) == ["red", "circle", "star"]
    assert random_baseline("red", ["red", "Red"], np.random.default_rng(0)) is None
    assert random_baseline("red", ["red", "blue"], np.random.default_rng(0)) == "blue"
    with pytest.raises(UnknownConcept, match="names none of its labels"):
        PrototypeEmbedder(MeanColour(), {"red": coloured((255, 0, 0), 2)}).embed_texts(["a dog"])
    np.testing.assert_allclose(np.linalg.norm(unit(np.ones((2, 3))), axis=1), 1.0, rtol=1e-6)


def test_empty_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocabulary: empty"):
        Pipeline(ExplainConfig(vocabulary=[], judge="none", similarity=False))


def chat_config(server, **kw) -> ExplainConfig:
    return ExplainConfig(
        explainer="chat",
        chat={"base_url": server.url, "model": "m", "backoff_s": 0.01},
        judge="none",
        similarity=False,
        use_ray=False,
        batch_size=2,
        **kw,
    )


def many(latents) -> list[LatentEvidence]:
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 8, 8), bool)
    masks[:, :4, :4] = True
    return [
        LatentEvidence(
            "c",
            i,
            rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
            np.eye(2)[None].repeat(2, 0),
            np.ones(2),
            concept_masks={"red": masks},
        )
        for i in latents
    ]


def test_batch_run_resumes_and_keeps_what_was_written(chat_server, tmp_path):
    chat_server.reply = lambda request: "red things"
    out = str(tmp_path)
    chat_server.script = [None, None, None, 500, 500, 500]  # the second batch: one latent fails for good
    with pytest.raises(ValueError, match="gave up"):
        explain_latents(
            many(range(6)),
            chat_config(chat_server).model_copy(
                update={"chat": chat_config(chat_server).chat.model_copy(update={"max_retries": 2, "concurrency": 1})}
            ),
            out,
        )
    assert sorted(read_explanations(out)) == [0, 1], "the batch finished before the failure was kept"
    chat_server.requests.clear()
    summary = explain_latents(many(range(6)), chat_config(chat_server), out)
    assert summary.explained == 4 and summary.already_done == 2 and len(chat_server.requests) == 4
    records = read_explanations(out)
    assert sorted(records) == list(range(6)) and records[5].explanation == "red things"
    assert records[5].scores["iou"] > 0, "scored against the ground-truth mask of the concept it names"
    assert explain_latents(many(range(6)), chat_config(chat_server), out).explained == 0


def test_detector_latents_counts_each_latent_once_with_its_own_best_value():
    from prisma_ray.evaluate.ground_truth import Detector, detector_latents

    rng = np.random.default_rng(0)
    colour = np.array(["red", "blue", None] * 40, dtype=object)
    shape = np.array(["circle", "circle", None] * 40, dtype=object)
    noise = rng.random((120, 4)) * 0.1
    latents = noise.copy()
    latents[:, 0] += (colour == "red") * 2.0  # red only: best red
    latents[:, 1] += (colour == "red") * 1.0 + (colour == "blue") * 0.9  # circle (every object): best circle
    latents[:, 2] += (colour == "red") * 0.5  # red too, but worse than latent 0: still a detector of red
    latents[:, 3] = 0.0  # never fires
    found = detector_latents(latents, {"shape": shape, "colour": colour})
    assert [(d.latent, d.value) for d in found] == [(0, "red"), (1, "circle"), (2, "red")]
    assert isinstance(found[0], Detector) and found[0].auroc == 1.0
    assert found[1].detected == ("circle", "red")  # red ranks above blue: AUROC 1 too; blue 0.75, below 0.95
    assert detector_latents(latents, {"shape": shape, "colour": colour}, threshold=1.01) == []
