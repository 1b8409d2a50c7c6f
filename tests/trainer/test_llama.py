"""model.arch: llama — shapes, presets, Hugging Face weights in, and world invariance.

A tiny random ``LlamaForCausalLM`` is made by ``transformers`` and saved to a temp
dir (nothing is downloaded); Tenax loads it with ``model.init_from`` and must
compute the same logits, and the same first-step loss in every layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from common.layout import partition_for_spec
from common.spec import MODEL_PRESETS, JobSpec, SpecError
from protos import launch
from tests.conftest import REPO
from tests.helpers.trainer_helpers import run_sweep
from trainer import hf
from trainer.data import StepSampler, build_dataset
from trainer.model import build_stage, init_parameters

warnings.filterwarnings("ignore", module="transformers")

TINY = {"arch": "llama", "layers": 3, "d_model": 32, "heads": 4, "kv_heads": 2, "ffn_dim": 48,
        "vocab_size": 64, "seq_len": 16, "dropout": 0.0, "rope_base": 5000.0, "norm_eps": 1e-5}


def llama_spec(**model) -> dict:
    return {
        "name": "tiny-llama", "seed": 3, "steps": 6, "global_batch_size": 8, "micro_batch_size": 1,
        "model": {**TINY, **model},
        "data": {"kind": "synthetic", "num_samples": 128},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "parallelism": {"dp": 1, "pp": 1, "zero_stage": 0}, "resources": {"workers": 1},
    }


def save_hf_llama(directory, *, tie: bool, seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM with TINY's shapes, saved as config.json + safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, **overrides)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    return model


def hf_loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


# ------------------------------------------------------------------ spec
def test_preset_sets_published_shapes_and_given_fields_win():
    spec = JobSpec.from_dict({"model": {"preset": "llama-1b", "layers": 2, "seq_len": 64}})
    m = spec.model
    assert (m.arch, m.d_model, m.heads, m.kv_heads, m.ffn_dim, m.vocab_size) == ("llama", 2048, 32, 8, 8192, 128256)
    assert (m.rope_base, m.tie_embeddings, m.layers, m.seq_len) == (500000.0, True, 2, 64)
    assert JobSpec.from_dict(spec.to_dict()) == spec  # a round trip keeps the overrides
    for name in MODEL_PRESETS:
        JobSpec.from_dict({"model": {"preset": name}})


@pytest.mark.parametrize("model, message", [
    ({"preset": "llama-70"}, "model.preset: unknown preset"),
    ({"arch": "llama", "heads": 4, "kv_heads": 3}, "model.kv_heads: must divide heads=4"),
    ({"kv_heads": 2}, "model.kv_heads: only for arch 'llama'"),
    ({"init_from": "/x"}, "model.init_from: only for arch 'llama'"),
    ({"arch": "llama", "rope_base": 0}, "model.rope_base: must be in (0, 1e+12]"),
    ({"arch": "llama", "norm_eps": 1.5}, "model.norm_eps: must be <= 1"),
    ({"arch": "llama", "ffn_dim": 1 << 20}, "model.ffn_dim: must be <= 131072"),
    ({"arch": "llama", "layers": 4096}, "model.layers: must be <= 256"),
    ({"arch": "llama", "vocab_size": 1 << 25}, "model.vocab_size: must be <= 1048576"),
])
def test_bad_llama_fields_are_refused_by_name(model, message):
    with pytest.raises(SpecError, match=None) as err:
        JobSpec.from_dict({"model": model})
    assert str(err.value).startswith(message), str(err.value)


def test_tied_embeddings_with_zero2_are_refused():
    with pytest.raises(SpecError, match=r"^model.tie_embeddings: is not supported with parallelism.zero_stage 2"):
        JobSpec.from_dict({**llama_spec(tie_embeddings=True), "parallelism": {"dp": 1, "pp": 1, "zero_stage": 2}})


def test_llama_pipeline_split_balances_its_own_costs():
    # a huge vocabulary head makes the last stage expensive: it gets fewer blocks
    spec = JobSpec.from_dict({"model": {**TINY, "layers": 8, "d_model": 64, "vocab_size": 200_000}})
    bounds = partition_for_spec(spec.model, 2)
    assert bounds[0] == 0 and bounds[-1] == 8 and bounds[1] > 4


# ------------------------------------------------------------------ weights in
@pytest.mark.parametrize("tie", [False, True])
def test_init_from_gives_transformers_logits_on_any_stage_split(tmp_path, tie):
    model = save_hf_llama(tmp_path, tie=tie)
    spec = JobSpec.from_dict(llama_spec(tie_embeddings=tie, init_from=str(tmp_path)))
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    for bounds in ((0, 3), (0, 1, 3), (0, 1, 2, 3)):
        stages = [build_stage(spec.model, layers=range(a, b), is_first=i == 0, is_last=b == 3)
                  for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        x = tokens
        with torch.no_grad():
            for stage in stages:
                init_parameters(stage, seed=0, layers=3)  # overwritten: proves the load does it all
                hf.load_stage(stage, spec.model, str(tmp_path))
                x = stage.eval()(x)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_a_stage_reads_only_its_own_tensors(tmp_path, monkeypatch):
    import safetensors

    save_hf_llama(tmp_path, tie=False)
    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    spec = JobSpec.from_dict(llama_spec(init_from=str(tmp_path)))
    last = build_stage(spec.model, layers=range(2, 3), is_first=False, is_last=True)
    hf.load_stage(last, spec.model, str(tmp_path))
    assert sorted(read) == sorted(["lm_head.weight", "model.norm.weight"] + [
        f"model.layers.2.{n}" for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                        "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")])


@pytest.mark.parametrize("tie, dtype, tolerance", [(False, "float32", 1e-5), (True, "float32", 1e-5),
                                                   (True, "bfloat16", 5e-2)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tie, dtype, tolerance):
    from transformers import LlamaForCausalLM

    spec = JobSpec.from_dict(llama_spec(tie_embeddings=tie))
    stage = build_stage(spec.model, layers=range(3), is_first=True, is_last=True)
    init_parameters(stage, seed=9, layers=3)
    hf.export_hf(dict(stage.named_parameters()), spec.model, tmp_path / "out", dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings is tie
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, stage.eval()(tokens), rtol=tolerance, atol=tolerance)
    # and back: what was exported loads into a job again
    again = build_stage(spec.model, layers=range(3), is_first=True, is_last=True)
    hf.load_stage(again, JobSpec.from_dict(llama_spec(tie_embeddings=tie, init_from=str(tmp_path / "out"))).model,
                  str(tmp_path / "out"))
    if dtype == "float32":
        for (name, a), (_, b) in zip(stage.named_parameters(), again.named_parameters()):
            assert torch.equal(a, b), name


def test_random_init_ties_head_to_embedding():
    spec = JobSpec.from_dict(llama_spec(tie_embeddings=True))
    first = build_stage(spec.model, layers=range(0, 1), is_first=True, is_last=False)
    last = build_stage(spec.model, layers=range(1, 3), is_first=False, is_last=True)
    for s in (first, last):
        init_parameters(s, seed=5, layers=3)
    assert torch.equal(first.tok_emb.weight, last.head.weight)


def _rewrite(directory, drop: str = "", reshape: str = ""):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].contiguous()
    save_file(tensors, str(path))


@pytest.mark.parametrize("change, message", [
    (lambda d: _rewrite(d, drop="model.layers.1.mlp.up_proj.weight"),
     "tensor model.layers.1.mlp.up_proj.weight (for blocks.1.up.weight) is missing"),
    (lambda d: _rewrite(d, reshape="model.layers.2.self_attn.k_proj.weight"),
     "tensor model.layers.2.self_attn.k_proj.weight has shape (15, 32), the job's blocks.2.k.weight needs (16, 32)"),
    (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling 'llama3'"),
    (lambda d: _edit_config(d, num_hidden_layers=4), "num_hidden_layers is 4 but model.layers is 3"),
    (lambda d: _edit_config(d, tie_word_embeddings=True), "tie_word_embeddings is True but model.tie_embeddings"),
])
def test_bad_checkpoint_is_refused_naming_the_problem(tmp_path, change, message):
    save_hf_llama(tmp_path, tie=False)
    change(tmp_path)
    spec = JobSpec.from_dict(llama_spec(init_from=str(tmp_path)))
    stage = build_stage(spec.model, layers=range(0, 3), is_first=True, is_last=True)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_stage(stage, spec.model, str(tmp_path))
    assert str(err.value).startswith("model.init_from:") and message in str(err.value), str(err.value)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if "rope_scaling" in changes:
        config.pop("rope_parameters", None)
    config.update(changes)
    path.write_text(json.dumps(config))


def test_sharded_checkpoint_with_index_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = save_hf_llama(tmp_path, tie=False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / hf.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    spec = JobSpec.from_dict(llama_spec(init_from=str(tmp_path)))
    stage = build_stage(spec.model, layers=range(0, 3), is_first=True, is_last=True)
    hf.load_stage(stage, spec.model, str(tmp_path))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(stage.eval()(tokens), model(tokens).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ layouts (real processes)
def _losses(records):
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


@pytest.mark.timeout(300)
def test_init_from_first_step_loss_matches_transformers_in_dp1pp1_and_dp2pp2(tmp_path):
    model = save_hf_llama(tmp_path / "hf", tie=False)
    raw = llama_spec(init_from=str(tmp_path / "hf"))
    raw["steps"] = 3
    spec = JobSpec.from_dict(raw)
    batch = StepSampler(build_dataset(spec), global_batch_size=spec.global_batch_size,
                        seed=spec.seed).batch_tokens(0, range(spec.global_batch_size))
    expected = hf_loss(model, batch)
    runs = [{"name": "dp1pp1", "dp": 1, "pp": 1, "zero": 0, "shares": [8]},
            {"name": "dp2pp2", "dp": 2, "pp": 2, "zero": 1, "shares": [3, 5]}]
    sweep = run_sweep(tmp_path, raw, runs, nproc=4, timeout_s=240)
    reference = _losses(sweep["dp1pp1"][0])
    assert reference[0] == pytest.approx(expected, abs=1e-4)
    assert len(set(reference)) == 3  # the weights really move
    for rank, records in sweep["dp2pp2"].items():
        assert _losses(records) == pytest.approx(reference, rel=1e-5), f"dp2pp2 rank {rank}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tie", [False, True])
def test_every_layout_trains_the_same_llama(tmp_path, tie):
    raw = llama_spec(tie_embeddings=tie, dropout=0.1, layers=4)
    runs = [{"name": "dp1pp1z0", "dp": 1, "pp": 1, "zero": 0, "shares": [8]},
            {"name": "pp2z0", "dp": 1, "pp": 2, "zero": 0, "shares": [8]},
            {"name": "dp2pp2z1", "dp": 2, "pp": 2, "zero": 1, "shares": [5, 3]},
            {"name": "dp4z0", "dp": 4, "pp": 1, "zero": 0, "shares": [2, 3, 2, 1]}]
    if not tie:
        runs.append({"name": "dp2pp2z2", "dp": 2, "pp": 2, "zero": 2, "shares": [4, 4]})
    sweep = run_sweep(tmp_path, raw, runs, nproc=4, timeout_s=240)
    reference = _losses(sweep["dp1pp1z0"][0])
    assert len(reference) == raw["steps"] and len(set(reference)) == raw["steps"]
    assert reference[-1] < reference[0]
    for run, ranks in sweep.items():
        for rank, records in ranks.items():
            assert _losses(records) == pytest.approx(reference, rel=1e-5), f"{run} rank {rank}"


# ------------------------------------------------------------------ examples
def _example(name: str) -> dict:
    import yaml

    from tests.helpers.trainer_helpers import REPO

    return yaml.safe_load((REPO / "examples" / name).read_text())


def test_llama_examples_are_valid_jobs():
    gpu = JobSpec.from_dict(_example("llama-1b-gpu.yaml"))
    assert gpu.model.d_model == 2048 and gpu.model.layers == 16 and gpu.resources.device == "cuda"
    JobSpec.from_dict(_example("llama-text.yaml"))


@pytest.mark.timeout(300)
def test_llama_text_example_learns_the_readme(tmp_path):
    from tests.helpers.trainer_helpers import REPO
    from trainer import data

    raw = _example("llama-text.yaml")
    assert data.main(["build", str(REPO / "README.md"), str(tmp_path / "text.tokens")]) == 0
    assert data.main(["build", str(REPO / "docs" / "elastic-recovery.md"), str(tmp_path / "held.tokens")]) == 0
    raw["data"].update(path=str(tmp_path / "text.tokens"), eval_path=str(tmp_path / "held.tokens"), eval_every=20)
    raw["steps"] = 40
    runs = [{"name": "example", "dp": 2, "pp": 2, "zero": 1, "shares": [8, 8]}]
    records = sorted(run_sweep(tmp_path, raw, runs, nproc=4, timeout_s=240)["example"][3], key=lambda r: r["step"])
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]


@pytest.mark.timeout(120)
def test_a_worker_refuses_a_checkpoint_that_does_not_fit_at_launch(tmp_path):
    """Before any rendezvous: exit 2 with the problem named, not a training failure (exit 1)."""
    save_hf_llama(tmp_path / "hf", tie=False)
    _edit_config(tmp_path / "hf", num_hidden_layers=4)
    spec = llama_spec(init_from=str(tmp_path / "hf"))
    plan = {"job_id": "j", "generation": 1, "dp": 1, "pp": 1, "zero_stage": 0, "layer_partition": [0, 3],
            "sample_shares": [8], "store_address": "127.0.0.1:1", "store_prefix": "j/g1/",
            "workers": [{"rank": 0, "node": "n", "slot": 0, "dp_rank": 0, "pp_rank": 0}]}
    (tmp_path / "launch.json").write_text(json.dumps({"spec": spec, "plan": plan}))
    result = subprocess.run([sys.executable, "-m", "trainer.worker"], cwd=REPO, capture_output=True, text=True,
                            timeout=100, env={**os.environ, "PYTHONPATH": str(REPO),
                                              launch.LAUNCH_FILE: str(tmp_path / "launch.json"), launch.RANK: "0"})
    assert result.returncode == 2, result.stderr
    assert "num_hidden_layers is 4 but model.layers is 3" in result.stderr
