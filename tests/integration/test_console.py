"""What `prisma-ray` prints: its own progress bar and summary, none of Ray's internals (they stay in Ray's session
log folder unless `-v`); one extraction run by the CLI in a fresh process (its own local Ray, token auth left
to Ray's default as a user's shell would), so that the console set-up is the one a user gets."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prisma_ray.runtime import console, session

REPO = Path(__file__).resolve().parents[2]

# Ray's lines a normal run must not print: its C++ and Python loggers, Train's placement-group cleaner,
# token authentication, Ray Data's progress-bar and execution messages, and anything that looks like an error
RAY_NOISE = [
    r"core_worker\.cc",
    r"Failed to query Ray Train Controller",
    r"Token authentication",
    r"Progress bars disabled",
    r"Started a local Ray instance",
    r"\(raylet\)|\(pid=\d+",
    r"\bWARNING\b|\bERROR\b|\bTraceback\b|\bE\d{4} ",
]


def test_a_local_ray_is_started_quiet_unless_verbose(monkeypatch):
    """`ensure_ray` starts Ray with the console's options: worker output (actors, tasks, Ray Train's controller and
    its placement-group cleaner) to the session's log files, not to this process's console."""
    calls = []
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for verbose in (False, True):
        monkeypatch.setattr(console, "_verbose", verbose)
        session.ensure_ray(session.RayOptions(num_cpus=1))
    assert [(c["log_to_driver"], c["logging_level"]) for c in calls] == [(False, 40), (True, 20)]


@pytest.mark.slow
def test_a_cli_run_prints_its_progress_and_summary_and_none_of_rays_internals(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a user's shell: no Ray settings
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))  # a fresh ~/.ray (token auth on by default)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "prisma_ray.cli",
            "extract",
            "--set",
            "model=prisma-toy-vit-shapes",
            "--set",
            "pretrained=false",
            "--set",
            "hooks=[blocks.1.hook_resid_post]",
            "--set",
            f"dataset={{type: synthetic, uri: {tmp_path / 'data'}, generator: {{name: shapes, n_images: 8}}}}",
            "--set",
            f"output={tmp_path / 'out'}",
            "--set",
            "shard_size=4",
            "--set",
            "ray.num_cpus=2",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-4000:]
    assert "extract: 100%" in printed and "2/2" in printed, "the stage's progress bar"
    assert re.search(r"shards +2 written", printed) and re.search(r"samples +8 ", printed), "the run's summary"
    noise = [line for line in printed.splitlines() if any(re.search(p, line) for p in RAY_NOISE)]
    assert not noise, "Ray's internals in a normal run's console:\n" + "\n".join(noise[:20])
