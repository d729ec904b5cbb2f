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
