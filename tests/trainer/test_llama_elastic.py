"""A Llama job under the elastic runtime: kill -9, recovery, disk checkpoints, export.

Real workers (``python -m trainer.worker``), a real etcd, plans written as the
controller would (tests/elastic_harness.py). The recovered job's losses must be
the uninterrupted run's; its last disk checkpoint, exported by ``tenax export``,
must load in ``transformers`` and give the loss Tenax evaluated on the same
held-out batch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.elastic_harness import REPO, ElasticJob, read_lines, reference_losses, tiny_spec
from trainer.data import TokenFile, write_token_file

warnings.filterwarnings("ignore", module="transformers")

LLAMA = {"arch": "llama", "layers": 4, "d_model": 32, "heads": 4, "kv_heads": 2, "ffn_dim": 48,
         "vocab_size": 64, "seq_len": 16, "dropout": 0.1, "tie_embeddings": True}


def _held_out(path) -> str:
    gen = torch.Generator().manual_seed(11)
    write_token_file(torch.randint(0, 64, (8 * 17 * 2,), generator=gen).tolist(), path)
    return str(path)


@pytest.mark.timeout(300)
def test_llama_survives_kill_9_with_the_same_losses_and_exports_to_transformers(tmp_path, etcd_url):
    from transformers import LlamaForCausalLM

    steps = 8
    spec = tiny_spec(steps=steps, dp=2, pp=2, zero=1, checkpoint_every=2, model=LLAMA,
                     data={"kind": "synthetic", "num_samples": 256, "eval_path": _held_out(tmp_path / "held.bin"),
                           "eval_every": 1, "eval_batches": 1})
    reference = reference_losses(spec, tmp_path / "reference")
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        job.start(faults="rank=3,step=4,kind=kill,when=mid")
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    survivors = [w for w in job.procs if w != dead]
    assert all(codes[w] == 0 for w in survivors), job.logs()
    trainers = [w for w in survivors if job.recoveries(*w) and job.steps(*w)[-1]["step"] == steps]
    assert trainers, job.logs()
    for where in trainers:
        last = {r["step"]: r for r in job.steps(*where)}  # a redone step keeps its post-recovery record
        assert sorted(last) == list(range(1, steps + 1))
        for step, record in last.items():
            assert math.isclose(record["loss"], reference[step], rel_tol=1e-4), (step, record["loss"], reference[step])
    # the held-out evaluations (every step) are the uninterrupted run's too
    ref_evals = {r["step"]: r["eval_loss"] for r in read_lines(tmp_path / "reference" / "metrics.jsonl")
                 if "eval_loss" in r}
    assert sorted(ref_evals) == list(range(1, steps + 1)) and len(set(ref_evals.values())) == steps
    for step, value in ref_evals.items():
        assert math.isclose(last[step]["eval_loss"], value, rel_tol=1e-4)

    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "cli.main", "export", str(job.out), "--format", "hf", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # the newest step every parameter of which is on disk: 8, or an earlier one when the job ended
    # before its last checkpoint was written (the writer is a daemon thread of the workers); after
    # the kill the survivors' replicas no longer cover a node, so every snapshot goes to disk (7)
    exported = int(run.stdout.split("exported step ")[1].split()[0])
    assert exported in (6, 7, 8), run.stdout
    model = LlamaForCausalLM.from_pretrained(str(out)).eval()
    held = TokenFile(tmp_path / "held.bin", dtype="uint16", seq_len=16, vocab_size=64)
    batch = torch.stack([held.sample(p) for p in range(spec.global_batch_size)])
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    hf_loss = F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)).item()
    assert hf_loss == pytest.approx(last[exported]["eval_loss"], abs=1e-4)

    # by job id: the local cluster's agents each hold the job's directory (here one node)
    state = tmp_path / "state"
    (state / "agents" / "node-0" / "jobs").mkdir(parents=True)
    (state / "agents" / "node-0" / "jobs" / "job1").symlink_to(job.out)
    (state / "cluster.json").write_text(json.dumps({"controller": "127.0.0.1:1", "state_dir": str(state)}))
    run = subprocess.run([sys.executable, "-m", "cli.main", "export", "job1", "--state-dir", str(state),
                          "--out", str(tmp_path / "hf2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_export_refuses_a_job_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    run = subprocess.run([sys.executable, "-m", "cli.main", "export", str(tmp_path), "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no launch file" in run.stderr, run.stderr


@pytest.mark.timeout(120)
def test_a_bad_init_from_checkpoint_stops_the_start_with_a_message_naming_it(tmp_path, etcd_url):
    from tests.trainer.test_llama import save_hf_llama

    save_hf_llama(tmp_path / "hf", tie=False)  # 3 layers; the job wants 4
    model = {**LLAMA, "tie_embeddings": False, "kv_heads": 2, "init_from": str(tmp_path / "hf")}
    spec = tiny_spec(steps=4, dp=1, pp=2, zero=0, model=model)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        job.start()
        _, code, _ = job.wait_for_death(timeout_s=60)
    finally:
        job.close()
    assert code == 2  # refused at launch, before any rendezvous (trainer/worker.py load_launch)
    assert "model.init_from: " in job.logs() and "num_hidden_layers is 3 but model.layers is 4" in job.logs()
