"""What a run lost and redid reaches its summary: training's restarts from a checkpoint."""

import json

from prisma_ray.train.job import RESTARTS_FILE, TrainSummary, _restarts


def summary(**kwargs) -> TrainSummary:
    return TrainSummary("run", 120, 7680, {}, None, "/out", [], **kwargs)


def test_the_train_summary_says_how_often_the_run_restarted_and_where_it_resumed():
    restarted = summary(restarts=2, resumed_from=40)
    line = "restarted 2 time(s) from a checkpoint (a worker or node lost, or the run relaunched); the last start "
    assert restarted.lost().startswith(line) and "resumed from step 40" in restarted.lost()
    assert restarted.lost() in restarted.format().splitlines()
    assert summary().lost() == "" and "restarted" not in summary().format()


def test_a_checkpoint_records_the_restarts_and_one_without_the_file_counts_none(tmp_path):
    assert _restarts(str(tmp_path)) == 0, "a checkpoint written before restarts were saved"
    (tmp_path / RESTARTS_FILE).write_text(json.dumps({"restarts": 3}))
    assert _restarts(str(tmp_path)) == 3


def test_the_training_progress_line_gives_step_metrics_pace_and_eta():
    from prisma_ray.runtime.console import duration, train_progress_line

    metrics = {"topk-k-16/loss": 0.012345, "topk-k-16/explained_variance": 0.9123, "topk-k-16/l0": 16.0}
    line = train_progress_line("sae", 1000, 4096, step=300, start=100, seconds=40.0, metrics=metrics)
    # 200 steps x 4096 tokens in 40 s; 700 steps left at 5 steps/s
    assert line == "train sae: step 300/1000 (30%), topk-k-16 loss 0.01235 ev 0.912 l0 16.0, 20.5k tokens/s, ETA 2m20s"
    many = {f"d{i}/loss": 1.0 for i in range(5)}
    assert (
        train_progress_line("g", 10, 8, 0, 0, 0.0, many)
        == "train g: step 0/10 (0%), d0 loss 1, d1 loss 1, d2 loss 1, 2 more dictionaries"
    )
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
    four = {f"d{i}/loss": 1.0 for i in range(4)}
    assert train_progress_line("g", 10, 8, 0, 0, 0.0, four).endswith("d2 loss 1, 1 more dictionary")


def test_counts_are_said_with_their_noun_in_the_singular_or_plural():
    from prisma_ray.runtime.console import counted
    from prisma_ray.runtime.devices import placement_line

    assert [counted(n, "dictionary", "dictionaries") for n in (1, 2)] == ["1 dictionary", "2 dictionaries"]
    assert placement_line(1, "train worker", "cuda") == "1 train worker on 1 GPU"
    assert placement_line(2, "actor", "cpu", 1) == "2 actors on CPU (1 torch thread each)"


def test_a_lost_progress_queue_never_fails_the_training_step():
    """CI: the node-loss test killed the node holding the progress queue's actor, and rank 0's next report raised
    `ActorDiedError`, so the run failed instead of resuming from its checkpoint. A dead queue drops the record."""
    from ray.exceptions import ActorDiedError

    from prisma_ray.train.job import send_progress

    class DeadQueue:
        def put(self, record):
            raise ActorDiedError()

    class LiveQueue(list):
        put = list.append

    send_progress(DeadQueue(), {"step": 1})
    live = LiveQueue()
    send_progress(live, {"step": 2})
    assert live == [{"step": 2}]


def test_the_rank_0_reports_reach_the_drivers_log_as_progress_lines(caplog):
    """A fake reporter (Ray Train's local mode: the loop runs here) sends what the rank-0 worker sends; the
    driver prints one progress line per report, at INFO (nothing that looks like an error)."""
    import logging

    from prisma_ray.train import job

    caplog.set_level(logging.INFO, logger="prisma_ray.train.job")
    with job._progress("sae", 200, 64, local=True) as report:
        for step in (50, 100):
            report(dict(step=step, start=0, seconds=step / 10, metrics={"topk-k-4/loss": 0.5}))
    lines = [r.getMessage() for r in caplog.records if r.name == "prisma_ray.train.job"]
    assert lines == [
        "train sae: step 50/200 (25%), topk-k-4 loss 0.5, 640 tokens/s, ETA 15s",
        "train sae: step 100/200 (50%), topk-k-4 loss 0.5, 640 tokens/s, ETA 10s",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)
