"""On real text (byte-level token file made by the tokenizer tool) the model learns."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers.trainer_helpers import REPO, tiny_spec
from trainer.telemetry import read_step_records

TEXT = (
    "Tenax keeps training through node loss, hung ranks and slow GPUs. "
    "Survivors never restart their processes, and no completed step is lost. "
    "The loss curve after a change of world size matches the one without it.\n"
) * 40


@pytest.mark.timeout(240)
def test_loss_goes_down_on_text(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    tokens = tmp_path / "corpus.bin"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    built = subprocess.run([sys.executable, "-m", "trainer.data", "build", str(text), str(tokens)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert built.returncode == 0, built.stderr
    assert tokens.stat().st_size == 2 * len(TEXT.encode())
    spec = tiny_spec(steps=40, global_batch_size=8, micro_batch_size=2)
    spec["model"].update(vocab_size=256, seq_len=32, dropout=0.0)
    spec["data"] = {"kind": "tokens", "path": str(tokens), "dtype": "uint16"}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec))
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.train_local", "train-local", "--nproc", "2", "--dp", "1", "--pp", "2",
         "--config", str(config), "--metrics", str(metrics), "--timeout", "200"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=220)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    records = read_step_records(metrics)
    rank0 = [r["loss"] for r in sorted((r for r in records if r["rank"] == 0), key=lambda r: r["step"])]
    assert len(rank0) == 40
    # every rank reports the same global loss each step
    assert all(r["loss"] == pytest.approx(rank0[r["step"] - 1], rel=1e-6) for r in records)
    start, end = sum(rank0[:3]) / 3, sum(rank0[-3:]) / 3
    assert start > 4.5  # ~ln(256): an untrained model
    assert end < 0.6 * start, f"loss did not go down enough: {start:.3f} -> {end:.3f}"
