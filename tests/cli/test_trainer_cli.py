"""``tenax train-local`` refuses bad configurations before any process starts,
and the worker refuses a bad launch with a clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers.trainer_helpers import REPO, tiny_spec
from cli import train_local as local


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenax")
    local.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if train-local tries to start anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process was started for an invalid configuration")
    monkeypatch.setattr(local.subprocess, "Popen", refuse)
    monkeypatch.setattr(local, "launch_workers", refuse)


def _run(argv, capsys) -> tuple[int, str]:
    args = _parser().parse_args(["train-local", *argv])
    code = args.func(args)
    return code, capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--nproc", "8", "--dp", "1", "--pp", "8"], "parallelism.pp: must be <= model.layers=4"),
        (["--nproc", "3", "--dp", "2", "--pp", "1"], "dp*pp must equal resources.workers"),
        (["--nproc", "2", "--dp", "2", "--pp", "1", "--shares", "15,1"], "larger than dp rank 1's share of 1"),
        (["--nproc", "2", "--dp", "2", "--pp", "1", "--shares", "5,3"], "sum to 8, not the global batch size 16"),
        (["--nproc", "2", "--dp", "2", "--pp", "1", "--shares", "a,b"], "--shares must be comma-separated"),
        (["--nproc", "2", "--dp", "2", "--pp", "1", "--zero", "3"], "parallelism.zero_stage: must be 0, 1 or 2"),
        (["--nproc", "0", "--dp", "1"], "--nproc must be >= 1"),
    ],
)
def test_bad_layouts_are_refused_before_start(argv, expected, no_processes, capsys, tmp_path):
    code, err = _run([*argv, "--metrics", str(tmp_path / "m.jsonl")], capsys)
    assert code == 2
    assert expected in err


@pytest.mark.timeout(60)
def test_micro_batch_larger_than_share_is_refused(no_processes, capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_spec(global_batch_size=8, micro_batch_size=4)))
    code, err = _run(["--config", str(config), "--nproc", "4", "--dp", "4", "--pp", "1",
                      "--metrics", str(tmp_path / "m.jsonl")], capsys)
    assert code == 2
    assert "micro_batch_size: micro-batch 4 is larger than a data-parallel share" in err


@pytest.mark.timeout(60)
def test_unknown_config_option_is_refused(no_processes, capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**tiny_spec(), "model": {**tiny_spec()["model"], "flash_attention": True}}))
    code, err = _run(["--config", str(config), "--nproc", "1", "--metrics", str(tmp_path / "m.jsonl")], capsys)
    assert code == 2
    assert "model.flash_attention: unknown option" in err


@pytest.mark.timeout(60)
def test_unknown_flag_is_refused(no_processes, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["train-local", "--nproc", "1", "--metrics", "x", "--tensor-parallel", "2"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --tensor-parallel" in capsys.readouterr().err


def _worker(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.worker"], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.mark.timeout(120)
def test_worker_refuses_a_bad_launch(tmp_path):
    missing = _worker({"TENAX_LAUNCH_FILE": "", "TENAX_RANK": "0"})
    assert missing.returncode == 2 and "TENAX_LAUNCH_FILE is not set" in missing.stderr
    launch = tmp_path / "launch.json"
    plan = {"job_id": "j", "generation": 1, "dp": 2, "pp": 1, "zero_stage": 0, "layer_partition": [0, 4],
            "sample_shares": [6, 6], "store_address": "127.0.0.1:1", "store_prefix": "p",
            "workers": [{"rank": r, "node": "n", "slot": r, "dp_rank": r, "pp_rank": 0} for r in range(2)]}
    launch.write_text(json.dumps({"spec": tiny_spec(), "plan": plan}))
    bad_rank = _worker({"TENAX_LAUNCH_FILE": str(launch), "TENAX_RANK": "5"})
    assert bad_rank.returncode == 2 and "TENAX_RANK='5' is not a rank" in bad_rank.stderr
    bad_knob = _worker({"TENAX_LAUNCH_FILE": str(launch), "TENAX_RANK": "0", "TENAX_PLAN_WAIT_S": "soon"})
    assert bad_knob.returncode == 2 and "TENAX_PLAN_WAIT_S must be a number of seconds, got 'soon'" in bad_knob.stderr
    plan["sample_shares"] = [11, 1]
    launch.write_text(json.dumps({"spec": tiny_spec(), "plan": plan}))
    bad_share = _worker({"TENAX_LAUNCH_FILE": str(launch), "TENAX_RANK": "0"})
    assert bad_share.returncode == 2 and "larger than dp rank 1's share of 1" in bad_share.stderr


@pytest.mark.timeout(120)
def test_worker_fails_fast_without_a_store(tmp_path):
    launch = tmp_path / "launch.json"
    plan = {"job_id": "j", "generation": 1, "dp": 1, "pp": 1, "zero_stage": 0, "layer_partition": [0, 4],
            "sample_shares": [12], "store_address": "127.0.0.1:9", "store_prefix": "p",
            "workers": [{"rank": 0, "node": "n", "slot": 0, "dp_rank": 0, "pp_rank": 0}]}
    launch.write_text(json.dumps({"spec": tiny_spec(), "plan": plan}))
    result = _worker({"TENAX_LAUNCH_FILE": str(launch), "TENAX_RANK": "0", "TENAX_STORE_TIMEOUT_S": "2"})
    assert result.returncode == 1
    assert "cannot reach the rendezvous store at 127.0.0.1:9" in result.stderr
