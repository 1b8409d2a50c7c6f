"""Pipeline point-to-point through host buffers (issue 15): the path that lets a dp×pp job run
over gloo with CUDA tensors (several ranks on one GPU). CI has no GPU, so the staging is forced
on CPU tensors (``TENAX_P2P_STAGING=1``): the same code path, with unpinned host buffers."""

from __future__ import annotations

import math

import pytest
import torch

from protos import launch
from tests.helpers.elastic_harness import ElasticJob, reference_losses, tiny_spec
from trainer.settings import WorkerSettings
from trainer.train import stages_p2p_through_host


def test_staging_is_chosen_for_gloo_with_cuda_tensors_or_when_forced():
    assert stages_p2p_through_host("1", torch.device("cpu"))
    assert not stages_p2p_through_host("0", torch.device("cuda"))
    assert not stages_p2p_through_host("auto", torch.device("cpu"))
    assert WorkerSettings.from_env({}).p2p_staging == "auto"
    assert WorkerSettings.from_env({launch.P2P_STAGING: "1"}).p2p_staging == "1"
    with pytest.raises(ValueError, match=launch.P2P_STAGING):
        WorkerSettings.from_env({launch.P2P_STAGING: "yes"})


def test_a_staged_pipeline_has_the_losses_of_dp1_pp1_and_survives_a_kill(tmp_path, etcd_url):
    steps = 8
    spec = tiny_spec(steps=steps, dp=1, pp=2, zero=1, snapshot_every="1")
    reference = reference_losses(spec, tmp_path / "reference")
    job = ElasticJob(spec, tmp_path / "job", etcd_url, env={launch.P2P_STAGING: "1"})
    try:
        job.start(faults="rank=1,step=5,kind=kill,when=mid")
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    survivor = next(w for w in codes if w != dead)
    assert codes[survivor] == 0, job.logs()
    lines = job.steps(*survivor)
    assert all(r.get("p2p_staging") for r in lines if r["generation"] == 1)  # the staged path ran
    (rec,) = job.recoveries(*survivor)
    assert rec["new_layout"] == "dp1pp1z1" and not rec["from_disk"] and rec["steps_lost"] <= 1
    last = {r["step"]: r["loss"] for r in lines}  # a redone step keeps its post-recovery loss
    assert sorted(last) == list(range(1, steps + 1))
    staged = {r["step"]: r["loss"] for r in lines if r["generation"] == 1}
    for step, loss in [*staged.items(), *last.items()]:
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, loss, reference[step])
