"""Hugging Face Llama checkpoints in and out: ``config.json`` + ``*.safetensors``.

In (``model.init_from``): ``check_checkpoint`` compares config.json with the job's
model fields and every tensor's name, shape and dtype (safetensors headers only,
no weights read) and refuses a mismatch with a message naming the field or
tensor; ``load_stage`` then copies into a stage only the tensors it owns, each
read on its own from the memory-mapped file (a rank of stage 2 never reads stage
1's layers).

Out (``tenax export``): ``export_hf`` writes the full model's tensors under
Hugging Face names with a config.json that ``transformers`` loads as
``LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from trainer.llama import TIED_EMBEDDING, TIED_HEAD

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "q.weight": "self_attn.q_proj.weight",
    "k.weight": "self_attn.k_proj.weight",
    "v.weight": "self_attn.v_proj.weight",
    "o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight",
    "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {TIED_EMBEDDING: "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
              TIED_HEAD: "lm_head.weight"}


class CheckpointError(ValueError):
    """A checkpoint does not fit the job; the message names the field or tensor."""


def hf_name(name: str) -> str:
    """Tenax global parameter name -> Hugging Face LlamaForCausalLM name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK.match(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def full_model_shapes(model_spec) -> dict[str, tuple[int, ...]]:
    """{Tenax name: shape} of the whole model (one stage holding every layer, on meta)."""
    from trainer.model import stage_param_shapes

    return dict(stage_param_shapes(model_spec, layers=range(model_spec.layers), is_first=True, is_last=True))


# ------------------------------------------------------------------ config
def _rope_theta(config: dict, where: str) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "?"
    if kind != "default":
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported (only plain rotary embeddings)")
    theta = config.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta if theta is not None else 10000.0)


def config_for(model_spec) -> dict:
    """The config.json of a Llama with these model fields."""
    m = model_spec
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.layers, "num_attention_heads": m.heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.d_model // m.heads, "hidden_act": "silu", "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_base, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1, "torch_dtype": "float32",
        "initializer_range": 0.02, "use_cache": True,
    }


def check_config(model_spec, directory: str | os.PathLike) -> dict:
    """Refuse a config.json that is not the job's Llama; returns it."""
    path = Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model.init_from: cannot read {path}: {exc}") from None
    where = f"model.init_from: {path}"
    if config.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type is {config.get('model_type')!r}, only 'llama' is supported")
    m = model_spec
    expected = {  # config key: (job field, job value)
        "hidden_size": ("d_model", m.d_model), "num_hidden_layers": ("layers", m.layers),
        "num_attention_heads": ("heads", m.heads), "intermediate_size": ("ffn_dim", m.mlp_dim),
        "vocab_size": ("vocab_size", m.vocab_size),
    }
    for key, (field, value) in expected.items():
        if config.get(key) != value:
            raise CheckpointError(f"{where}: {key} is {config.get(key)!r} but model.{field} is {value}")
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv != m.n_kv_heads:
        raise CheckpointError(f"{where}: num_key_value_heads is {kv} but model.kv_heads means {m.n_kv_heads}")
    if config.get("head_dim", m.d_model // m.heads) != m.d_model // m.heads:
        raise CheckpointError(f"{where}: head_dim {config['head_dim']} != d_model/heads = {m.d_model // m.heads}")
    if bool(config.get("tie_word_embeddings", False)) != m.tie_embeddings:
        raise CheckpointError(f"{where}: tie_word_embeddings is {config.get('tie_word_embeddings')} "
                              f"but model.tie_embeddings is {m.tie_embeddings}")
    theta = _rope_theta(config, where)
    if not abs(theta - m.rope_base) <= 1e-9 * m.rope_base:
        raise CheckpointError(f"{where}: rope_theta is {theta} but model.rope_base is {m.rope_base}")
    eps = float(config.get("rms_norm_eps", 1e-6))
    if not abs(eps - m.norm_eps) <= 1e-9 * m.norm_eps:
        raise CheckpointError(f"{where}: rms_norm_eps is {eps} but model.norm_eps is {m.norm_eps}")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    for key, value in unsupported.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{where}: {key} {config[key]!r} is not supported (only {value!r})")
    return config


# ------------------------------------------------------------------ tensors
def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", ...}} of a safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"model.init_from: {path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise CheckpointError(f"model.init_from: {path} has an implausible header size {size}")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def tensor_files(directory: str | os.PathLike) -> dict[str, Path]:
    """{HF tensor name: file holding it}: from the shard index if there is one, else every *.safetensors."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model.init_from: no *.safetensors file in {directory}")
    out = {}
    for path in files:
        for name in read_header(path):
            out[name] = path
    return out


def check_checkpoint(model_spec, directory: str | os.PathLike) -> dict[str, Path]:
    """Refuse a checkpoint that does not fit the job: config, then each tensor's presence,
    shape and dtype. Returns {HF name: file}."""
    check_config(model_spec, directory)
    files = tensor_files(directory)
    headers: dict[Path, dict] = {}
    for name, shape in full_model_shapes(model_spec).items():
        hf = hf_name(name)
        if name == TIED_HEAD and model_spec.tie_embeddings and hf not in files:
            continue  # a tied checkpoint may omit the head: it is the embedding
        if hf not in files:
            raise CheckpointError(f"model.init_from: tensor {hf} (for {name}) is missing from {directory}")
        path = files[hf]
        if path not in headers:
            if not path.exists():
                raise CheckpointError(f"model.init_from: {path} (named by {INDEX}) does not exist")
            headers[path] = read_header(path)
        meta = headers[path].get(hf)
        if meta is None:
            raise CheckpointError(f"model.init_from: tensor {hf} is missing from {path}")
        if tuple(meta["shape"]) != tuple(shape):
            raise CheckpointError(f"model.init_from: tensor {hf} has shape {tuple(meta['shape'])}, "
                                  f"the job's {name} needs {tuple(shape)}")
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"model.init_from: tensor {hf} has unsupported dtype {meta['dtype']}")
    return files


@torch.no_grad()
def load_stage(stage, model_spec, directory: str | os.PathLike) -> None:
    """Copy the checkpoint's tensors of this stage's parameters into it (in place, as fp32)."""
    from safetensors import safe_open

    files = check_checkpoint(model_spec, directory)
    wanted: dict[Path, list[tuple[str, str, torch.Tensor]]] = {}
    for name, param in stage.named_parameters():
        hf = hf_name(name)
        if name == TIED_HEAD and model_spec.tie_embeddings and hf not in files:
            hf = hf_name(TIED_EMBEDDING)
        wanted.setdefault(files[hf], []).append((name, hf, param))
    for path, items in wanted.items():
        with safe_open(str(path), framework="pt") as f:
            for _name, hf, param in items:
                param.copy_(f.get_tensor(hf).to(torch.float32))


# ------------------------------------------------------------------ out
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(tensors: dict[str, torch.Tensor], model_spec, out_dir: str | os.PathLike, *,
              dtype: str = "float32") -> Path:
    """Write {Tenax name: full tensor} as config.json + model.safetensors under ``out_dir``
    (tensors cast to ``dtype``: the fp32 master weights by default)."""
    from safetensors.torch import save_file

    shapes = full_model_shapes(model_spec)
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise ValueError(f"export: the state has no {missing[0]} ({len(missing)} parameters missing)")
    out = {}
    for name, shape in shapes.items():
        if name == TIED_HEAD and model_spec.tie_embeddings:
            continue  # transformers ties lm_head to embed_tokens itself
        value = tensors[name].detach().to("cpu", EXPORT_DTYPES[dtype]).reshape(shape).contiguous()
        out[hf_name(name)] = value
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps({**config_for(model_spec), "torch_dtype": dtype}, indent=2) + "\n")
    return out_dir
