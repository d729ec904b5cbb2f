"""The quickstart's stage configs: each stage reads what the previous one wrote, under one output root."""

from prisma_ray import storage
from prisma_ray.quickstart import QuickstartConfig, extract_configs, leaderboard_rows, sweep_config, train_config


def test_stages_chain_under_one_output(tmp_path):
    cfg = QuickstartConfig(output=str(tmp_path / "qs"))
    image, video = cfg.models
    train, test = extract_configs(cfg, image)
    assert (train.split, test.split) == ("train", "test") and train.pretrained and train.model == image.name
    assert (
        train.dataset.generator.n_images == image.train_samples
        and test.dataset.generator.n_images == image.test_samples
    )
    assert train.dataset.generator.seed != test.dataset.generator.seed, "the test split is held out"
    assert extract_configs(cfg, video)[0].dataset.generator.name == "moving-shapes"
    run = train_config(cfg, image)
    assert run.data.inputs == [storage.join(train.output, image.name, image.hook, "train")]
    assert [d.display_name() for d in run.dictionaries] == ["topk-k-4", "topk-k-8", "topk-k-16"]
    sweep = sweep_config(cfg)
    assert sweep.evaluation.stores == train.output and sweep.evaluation.split == "test"
    assert run.output_uri.startswith(sweep.checkpoints[0]) and "runs" not in sweep.checkpoints[0]


def test_s3_output_reaches_every_stage():
    cfg = QuickstartConfig(output="s3://bucket/qs")
    image = cfg.models[0]
    uris = [e.output for e in extract_configs(cfg, image)] + [train_config(cfg, image).runs]
    uris += sweep_config(cfg).checkpoints + [sweep_config(cfg).output]
    assert all(u.startswith("s3://bucket/qs/") for u in uris)


def test_leaderboard_rows_are_grouped_by_model_best_first():
    import pyarrow as pa

    table = pa.Table.from_pylist(
        [
            {"model": "b", "explained_variance": 0.5},
            {"model": "a", "explained_variance": 0.2},
            {"model": "a", "explained_variance": 0.9},
            {"model": "b", "explained_variance": None},
        ]
    )
    assert [(r["model"], r["explained_variance"]) for r in leaderboard_rows(table)] == [
        ("a", 0.9),
        ("a", 0.2),
        ("b", 0.5),
        ("b", None),
    ]
