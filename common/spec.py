"""The job specification: one tree of small settings, validated once at the edge.

A job file (YAML), the gRPC ``JobSpec`` message and this tree use the same
field names. ``JobSpec.from_dict`` is the single entry point for untrusted
input: it refuses unknown keys and bad values with a ``ValueError`` whose
message starts with the dotted field path (``parallelism.dp: must be >= 1``).
The controller, the CLI and ``tenax train-local`` all go through it, so a bad
spec is refused before anything is written or any process starts.

This module must stay import-light (no torch): the controller imports it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_NAME_LEN = 63
MAX_STRING_LEN = 256
MAX_PATH_LEN = 4096
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

ARCHS = ("gpt", "llama")
MAX_LAYERS = 256
"""Most transformer blocks: the plan math (layer partition) stays bounded (issue 18)."""
MAX_D_MODEL = 65_536
"""Widest hidden size (features)."""
MAX_WIDTH = 1 << 17
"""Widest MLP inner size, ``ffn_dim`` (features)."""
MAX_HEADS = 1024
MAX_VOCAB = 1 << 20
MAX_SEQ_LEN = 131_072
MAX_ROPE_BASE = 1e12
MAX_EVAL_EVERY = 10_000_000
MAX_EVAL_BATCHES = 10_000

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Shapes of published checkpoints (their config.json); the long-context rope
    # scaling of Llama 3.x is not modelled, so seq_len stays what the job trains at.
    "tinyllama-1.1b": dict(arch="llama", layers=22, d_model=2048, heads=32, kv_heads=4, ffn_dim=5632,
                           vocab_size=32000, rope_base=10000.0, norm_eps=1e-5, tie_embeddings=False),
    "llama-1b": dict(arch="llama", layers=16, d_model=2048, heads=32, kv_heads=8, ffn_dim=8192,
                     vocab_size=128256, rope_base=500000.0, norm_eps=1e-5, tie_embeddings=True),
    "llama-3b": dict(arch="llama", layers=28, d_model=3072, heads=24, kv_heads=8, ffn_dim=8192,
                     vocab_size=128256, rope_base=500000.0, norm_eps=1e-5, tie_embeddings=True),
    "llama-7b": dict(arch="llama", layers=32, d_model=4096, heads=32, kv_heads=32, ffn_dim=11008,
                     vocab_size=32000, rope_base=10000.0, norm_eps=1e-5, tie_embeddings=False),
    "llama-8b": dict(arch="llama", layers=32, d_model=4096, heads=32, kv_heads=8, ffn_dim=14336,
                     vocab_size=128256, rope_base=500000.0, norm_eps=1e-5, tie_embeddings=False),
}
"""``model.preset`` name -> the model fields it sets (fields given next to it win):
llama-1b/3b are Llama 3.2 1B/3B, llama-7b is Llama 2 7B, llama-8b is Llama 3 8B."""
DATA_KINDS = ("synthetic", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")
OPTIMIZERS = ("adamw",)
DEVICES = ("cpu", "cuda")
STRAGGLER_POLICIES = ("rebalance", "evict", "alert")


DEFAULT_CHECKPOINT_EVERY = 100
"""Steps between disk checkpoints unless the spec says otherwise. A checkpoint costs the
training loop only a host copy of a snapshot it took anyway (the copy and the write run on a
background thread), so at this interval its share of the training time stays under 1% as long as
one checkpoint's copy and write interfere for less than one step's time."""


class SpecError(ValueError):
    """A job spec is invalid. The message names the field (dotted path)."""


# ------------------------------------------------------------ upper bounds
# Every numeric field has a ceiling, checked at submit (``JobSpec.validate``), chosen so
# that a valid spec cannot hurt the service: the controller's plan math
# (common/layout.py balances pp stages over the layers, O(pp * layers^2)) stays in the
# milliseconds, an etcd record stays small, and nothing overflows int64 on the wire.
# A field added to a spec section gets its bound here too (tests/security/test_security_spec_bounds.py
# checks that every numeric field has one).
MAX_CHECKPOINT_KEEP = 1_000
"""Most disk checkpoints a worker keeps (each is a full copy of its state on the host's disk)."""
SPEC_UPPER_BOUNDS: dict[str, float] = {
    "model.layers": MAX_LAYERS,
    "model.d_model": MAX_D_MODEL,
    "model.heads": MAX_HEADS,
    "model.vocab_size": MAX_VOCAB,
    "model.seq_len": MAX_SEQ_LEN,
    "model.dropout": 1.0,
    "data.num_samples": 1 << 40,
    "optimizer.lr": 10.0,
    "optimizer.min_lr": 10.0,
    "optimizer.warmup_steps": 1_000_000_000,
    "optimizer.weight_decay": 10.0,
    "optimizer.beta1": 1.0,
    "optimizer.beta2": 1.0,
    "optimizer.eps": 1.0,
    "optimizer.grad_clip": 1e6,
    "parallelism.dp": 1_024,
    "parallelism.pp": 64,
    "elastic.min_workers": 4_096,
    "elastic.max_workers": 4_096,
    "elastic.checkpoint_every": 1_000_000_000,
    "elastic.checkpoint_keep": MAX_CHECKPOINT_KEEP,
    "model.kv_heads": MAX_HEADS,
    "model.ffn_dim": MAX_WIDTH,
    "model.rope_base": MAX_ROPE_BASE,
    "model.norm_eps": 1.0,
    "data.eval_every": MAX_EVAL_EVERY,
    "data.eval_batches": MAX_EVAL_BATCHES,
    "resources.workers": 4_096,
    "resources.host_memory_gb": 16_384.0,
    "seed": (1 << 63) - 1,
    "steps": 1_000_000_000,
    "global_batch_size": 1 << 20,
    "micro_batch_size": 65_536,
}
BOUNDED_BY_CHOICES = ("parallelism.zero_stage",)
"""Numeric fields whose validation admits a fixed set of values (0, 1 or 2), so no upper bound."""
MAX_SNAPSHOT_EVERY = 1_000_000_000
"""Largest numeric ``elastic.snapshot_every`` (steps)."""
MAX_PARAMETERS = 200e9
"""Largest model (parameters, estimated as layers*12*d_model^2 + vocab*d_model): no host holds more."""
MAX_SPEC_NESTING = 32
"""Deepest nesting a job file may have (levels); a spec needs 3."""


def _check_upper_bounds(spec: "JobSpec") -> None:
    for dotted, bound in SPEC_UPPER_BOUNDS.items():
        value: Any = spec
        for part in dotted.split("."):
            value = getattr(value, part)
        if value > bound:
            shown = f"{bound:g}" if isinstance(bound, float) else f"{bound}"
            _fail(dotted, f"must be <= {shown}, got {_short(value)}")
    snap = spec.elastic.snapshot_every
    if snap.isdigit() and int(snap) > MAX_SNAPSHOT_EVERY:
        _fail("elastic.snapshot_every", f"must be <= {MAX_SNAPSHOT_EVERY}, got {_short(snap)}")
    m = spec.model
    params = m.layers * 12.0 * m.d_model * m.d_model + float(m.vocab_size) * m.d_model
    if params > MAX_PARAMETERS:
        _fail("model", f"about {params:.3g} parameters (layers*12*d_model^2 + vocab_size*d_model); "
                       f"at most {MAX_PARAMETERS:.3g}")


def _depth(data: Any, limit: int) -> int:
    """Nesting depth of plain data, counting no further than ``limit + 1`` (iterative: no recursion)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def load_spec_text(text: str, source: str = "job file") -> Any:
    """Parse a YAML job file into plain data; SpecError (never a traceback) if it is not YAML
    or nested absurdly deep (a recursive parse of such a file used to end in RecursionError)."""
    import yaml  # here, not at the top: the controller imports this module and never reads YAML

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"spec: {source} is nested too deeply (at most {MAX_SPEC_NESTING} levels)") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec: {source} is not valid YAML: {_short(exc)}") from None
    if _depth(data, MAX_SPEC_NESTING) > MAX_SPEC_NESTING:
        raise SpecError(f"spec: {source} is nested too deeply (at most {MAX_SPEC_NESTING} levels)")
    return data


def _fail(path: str, problem: str) -> None:
    raise SpecError(f"{path}: {problem}")


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
"""Values of ``model.activation_checkpointing`` (trainer/checkpointing.py)."""


@dataclass(kw_only=True)
class ModelSpec:
    preset: str = ""
    """Named size (``llama-1b``, ``llama-3b``, ``llama-7b``, ``llama-8b``, ``tinyllama-1.1b``) setting arch and shapes; fields given next to it win."""
    arch: str = "gpt"
    """``gpt`` (LayerNorm, learned positions, GELU, biases) or ``llama`` (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases)."""
    layers: int = 4
    """Transformer blocks (at most 1024); a pipeline stage owns a contiguous range of them."""
    d_model: int = 64
    """Hidden size (features, at most 131072)."""
    heads: int = 4
    """Attention heads; must divide ``d_model`` (at most 1024)."""
    kv_heads: int = 0
    """Key/value heads of grouped-query attention (llama); must divide ``heads``; 0 means ``heads``."""
    ffn_dim: int = 0
    """MLP inner size (features, llama; at most 131072); 0 means 4 * ``d_model``."""
    vocab_size: int = 256
    """Vocabulary size (tokens, at most 2^24). 256 fits the byte-level tokenizer."""
    seq_len: int = 32
    """Tokens per sample (at most 2^20)."""
    dropout: float = 0.1
    """Dropout probability in [0, 1); masks are keyed by (seed, step, sample, layer)."""
    activation_checkpointing: str = "none"
    """``none``, ``full`` (recompute each block in backward) or ``selective`` (keep the matrix
    products' and attention's outputs, recompute the rest): trainer/checkpointing.py."""
    rope_base: float = 10000.0
    """Rotary embedding base (theta, llama), in (0, 1e12]."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (llama), in (0, 1)."""
    tie_embeddings: bool = False
    """Head shares the token embedding (llama). With pp > 1 the first and last stage each hold a copy and sum their gradients: one extra all-reduce per step. Not with zero_stage 2."""
    init_from: str = ""
    """Directory of a Hugging Face Llama checkpoint (``config.json`` + ``*.safetensors``) to start from instead of random weights (llama); every rank reads only its stage's tensors."""

    @staticmethod
    def expand_preset(data: Any, path: str) -> Any:
        """The preset's fields under the given ones (given fields win)."""
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        name = data["preset"]
        if name not in MODEL_PRESETS:
            _fail(f"{path}.preset", f"unknown preset {_short(name)!r}; known: {', '.join(MODEL_PRESETS)}")
        return {**MODEL_PRESETS[name], **data}

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def mlp_dim(self) -> int:
        return self.ffn_dim or 4 * self.d_model

    def validate(self, path: str) -> None:
        if self.preset and self.preset not in MODEL_PRESETS:
            _fail(f"{path}.preset", f"unknown preset {_short(self.preset)!r}; known: {', '.join(MODEL_PRESETS)}")
        if self.arch not in ARCHS:
            _fail(f"{path}.arch", f"unknown architecture {self.arch!r}; known: {', '.join(ARCHS)}")
        for name, most in (("layers", MAX_LAYERS), ("d_model", MAX_D_MODEL), ("heads", MAX_HEADS),
                           ("seq_len", MAX_SEQ_LEN)):
            _positive(f"{path}.{name}", getattr(self, name))
            _at_most(f"{path}.{name}", getattr(self, name), most)
        if self.vocab_size < 2:
            _fail(f"{path}.vocab_size", f"must be >= 2, got {self.vocab_size}")
        _at_most(f"{path}.vocab_size", self.vocab_size, MAX_VOCAB)
        if self.d_model % self.heads:
            _fail(f"{path}.heads", f"must divide d_model={self.d_model}, got {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.kv_heads <= MAX_HEADS:
            _fail(f"{path}.kv_heads", f"must be in [0, {MAX_HEADS}], got {self.kv_heads}")
        if self.heads % self.n_kv_heads:
            _fail(f"{path}.kv_heads", f"must divide heads={self.heads}, got {self.kv_heads}")
        if not 0 <= self.ffn_dim <= MAX_WIDTH:
            _fail(f"{path}.ffn_dim", f"must be in [0, {MAX_WIDTH}], got {self.ffn_dim}")
        if not 0 < self.rope_base <= MAX_ROPE_BASE:
            _fail(f"{path}.rope_base", f"must be in (0, {MAX_ROPE_BASE:g}], got {self.rope_base}")
        if not 0 < self.norm_eps < 1:
            _fail(f"{path}.norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        if len(self.init_from) > MAX_PATH_LEN:
            _fail(f"{path}.init_from", f"longer than {MAX_PATH_LEN} characters")
        if self.arch == "gpt":
            # the GPT's shapes are fixed; a llama-only field set on it is a mistake, not a no-op
            for name, default in (("kv_heads", 0), ("ffn_dim", 0), ("tie_embeddings", False), ("init_from", "")):
                if getattr(self, name) != default:
                    _fail(f"{path}.{name}", "only for arch 'llama' (arch is 'gpt')")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            _fail(f"{path}.activation_checkpointing", f"must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                  f"got {self.activation_checkpointing!r}")


@dataclass(kw_only=True)
class DataSpec:
    kind: str = "synthetic"
    """``synthetic`` (seeded tokens) or ``tokens`` (a memory-mapped token file)."""
    path: str = ""
    """Token file for ``kind: tokens`` (see ``python -m trainer.data``)."""
    dtype: str = "uint16"
    """Element type of the token file: ``uint16`` or ``uint32``."""
    num_samples: int = 4096
    """Dataset size for ``kind: synthetic`` (samples)."""
    eval_path: str = ""
    """Held-out token file (same ``dtype``) evaluated every ``eval_every`` steps: loss and perplexity in the step's metrics."""
    eval_every: int = 0
    """Evaluation interval (steps, at most 10^7); 0 turns evaluation off."""
    eval_batches: int = 1
    """Global batches of the held-out file per evaluation (1 to 10^4), always the file's first ones."""

    def validate(self, path: str) -> None:
        if self.kind not in DATA_KINDS:
            _fail(f"{path}.kind", f"unknown data kind {self.kind!r}; known: {', '.join(DATA_KINDS)}")
        if self.kind == "tokens" and not self.path:
            _fail(f"{path}.path", "is required when kind is 'tokens'")
        if len(self.path) > MAX_PATH_LEN:
            _fail(f"{path}.path", f"longer than {MAX_PATH_LEN} characters")
        if self.dtype not in TOKEN_DTYPES:
            _fail(f"{path}.dtype", f"unknown dtype {self.dtype!r}; known: {', '.join(TOKEN_DTYPES)}")
        _positive(f"{path}.num_samples", self.num_samples)
        if len(self.eval_path) > MAX_PATH_LEN:
            _fail(f"{path}.eval_path", f"longer than {MAX_PATH_LEN} characters")
        if not 0 <= self.eval_every <= MAX_EVAL_EVERY:
            _fail(f"{path}.eval_every", f"must be in [0, {MAX_EVAL_EVERY}], got {self.eval_every}")
        if self.eval_every and not self.eval_path:
            _fail(f"{path}.eval_path", "is required when eval_every > 0")
        if not 1 <= self.eval_batches <= MAX_EVAL_BATCHES:
            _fail(f"{path}.eval_batches", f"must be in [1, {MAX_EVAL_BATCHES}], got {self.eval_batches}")


@dataclass(kw_only=True)
class OptimizerSpec:
    name: str = "adamw"
    """Optimizer; only ``adamw`` (fp32 master state)."""
    lr: float = 3e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 5
    """Linear warmup length (steps)."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    beta1: float = 0.9
    """AdamW first-moment decay, in [0, 1)."""
    beta2: float = 0.95
    """AdamW second-moment decay, in [0, 1)."""
    eps: float = 1e-8
    """AdamW denominator epsilon (> 0)."""
    grad_clip: float = 1.0
    """Clip the true global gradient norm to this value; 0 disables clipping."""

    def validate(self, path: str) -> None:
        if self.name not in OPTIMIZERS:
            _fail(f"{path}.name", f"unknown optimizer {self.name!r}; known: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            _fail(f"{path}.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            _fail(f"{path}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            _fail(f"{path}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            _fail(f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                _fail(f"{path}.{name}", f"must be in [0, 1), got {value}")
        if not self.eps > 0:
            _fail(f"{path}.eps", f"must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            _fail(f"{path}.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class Parallelism:
    dp: int = 1
    """Data-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree (stages); at most ``model.layers``."""
    zero_stage: int = 0
    """0: replicated; 1: optimizer state sharded over dp; 2: gradients too."""

    def validate(self, path: str) -> None:
        _positive(f"{path}.dp", self.dp)
        _positive(f"{path}.pp", self.pp)
        if self.zero_stage not in (0, 1, 2):
            _fail(f"{path}.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")


@dataclass(kw_only=True)
class ElasticSpec:
    min_workers: int = 1
    """Fewest workers the job may shrink to before it fails."""
    max_workers: int = 0
    """Most workers the job may grow to; 0 means ``resources.workers``."""
    snapshot_every: str = "auto"
    """In-memory snapshot interval: ``auto`` (default: the smallest interval whose snapshots stay
    hidden, measured in the first steps of every generation) or a positive integer (steps)."""
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    """Disk checkpoint interval (steps); 0 turns disk checkpoints off. Written asynchronously
    (torch.distributed.checkpoint, per rank) to the agent's ``--checkpoint-dir`` (shared by the
    nodes) or its run directory: they cover what the in-memory snapshots cannot (every copy of a
    shard lost). While the replicas do not survive the loss of a node (every rank and its buddy
    on one node, or a single worker), every snapshot the disk writer is free to take goes to disk
    as well (``trainer.decisions.disk_checkpoint_due``; free: idle for as long as its last
    checkpoint took, so a large state is written at most half the time), so such a loss costs
    the few steps of the writer's period, not a disk interval."""
    checkpoint_keep: int = 3
    """Newest disk checkpoints kept (count); older ones are deleted once a newer one is complete."""
    straggler_policy: str = "rebalance"
    """``rebalance`` sample shares, ``evict`` to a spare, or ``alert`` only."""

    def validate(self, path: str) -> None:
        _positive(f"{path}.min_workers", self.min_workers)
        if self.max_workers < 0:
            _fail(f"{path}.max_workers", f"must be >= 0, got {self.max_workers}")
        if self.snapshot_every != "auto" and not (self.snapshot_every.isdigit() and int(self.snapshot_every) > 0):
            _fail(f"{path}.snapshot_every", f"must be 'auto' or a positive integer, got {self.snapshot_every!r}")
        if self.checkpoint_every < 0:
            _fail(f"{path}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _positive(f"{path}.checkpoint_keep", self.checkpoint_keep)
        if self.straggler_policy not in STRAGGLER_POLICIES:
            _fail(
                f"{path}.straggler_policy",
                f"unknown policy {self.straggler_policy!r}; known: {', '.join(STRAGGLER_POLICIES)}",
            )


@dataclass(kw_only=True)
class Resources:
    workers: int = 1
    """Worker processes (one per slot: a GPU, or a CPU slot)."""
    device: str = "cpu"
    """``cpu`` (gloo) or ``cuda`` (NCCL, bf16 autocast)."""
    host_memory_gb: float = 0.0
    """Host memory (resident set, GB = 1e9 bytes) one worker may use; 0: no limit of the job's
    own (the agent's ``--worker-memory-limit-gb`` still applies; the smaller wins). A worker
    past it is killed and the job FAILS: it would repeat on any slot."""

    def validate(self, path: str) -> None:
        _positive(f"{path}.workers", self.workers)
        if self.host_memory_gb < 0:
            _fail(f"{path}.host_memory_gb", f"must be >= 0 (0: no limit), got {self.host_memory_gb}")
        if self.device not in DEVICES:
            _fail(f"{path}.device", f"unknown device {self.device!r}; known: {', '.join(DEVICES)}")


@dataclass(kw_only=True)
class JobSpec:
    name: str = "job"
    """Job name: lowercase letters, digits and '-', at most 63 characters."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    seed: int = 0
    """Seeds everything: init, sample order, dropout masks."""
    steps: int = 50
    """Optimizer steps to train."""
    global_batch_size: int = 16
    """Samples per step across all ranks; fixed when the world changes."""
    micro_batch_size: int = 2
    """Samples per forward/backward on one rank (pipeline micro-batch)."""
    parallelism: Parallelism = field(default_factory=Parallelism)
    elastic: ElasticSpec = field(default_factory=ElasticSpec)
    resources: Resources = field(default_factory=Resources)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Any, *, path: str = "spec") -> "JobSpec":
        """Build and validate a spec from plain data (parsed YAML or JSON)."""
        spec = _build(cls, data, path)
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``SpecError`` naming the first bad field; return None if valid."""
        _check_upper_bounds(self)  # first: the checks below may do arithmetic on the values
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_LEN or not _NAME_RE.match(self.name):
            _fail(
                "name",
                f"must be 1-{MAX_NAME_LEN} lowercase letters, digits or '-' "
                f"(not starting or ending with '-'), got {_short(self.name)!r}",
            )
        self.model.validate("model")
        self.data.validate("data")
        self.optimizer.validate("optimizer")
        self.parallelism.validate("parallelism")
        self.elastic.validate("elastic")
        self.resources.validate("resources")
        if self.seed < 0:
            _fail("seed", f"must be >= 0, got {self.seed}")
        _positive("steps", self.steps)
        _positive("global_batch_size", self.global_batch_size)
        _positive("micro_batch_size", self.micro_batch_size)
        self._validate_layout()

    def _validate_layout(self) -> None:
        par, res = self.parallelism, self.resources
        if par.dp * par.pp != res.workers:
            _fail(
                "parallelism",
                f"dp*pp must equal resources.workers: {par.dp}*{par.pp}={par.dp * par.pp} != {res.workers}",
            )
        if self.model.tie_embeddings and par.zero_stage == 2:
            # ZeRO-2 reduces gradients to their owners inside backward, before the tied
            # copies could be summed (trainer.llama.TiedEmbeddings)
            _fail("model.tie_embeddings", "is not supported with parallelism.zero_stage 2 (use 0 or 1)")
        if par.pp > self.model.layers:
            _fail("parallelism.pp", f"must be <= model.layers={self.model.layers}, got {par.pp}")
        if self.global_batch_size < par.dp:
            _fail(
                "global_batch_size",
                f"global batch {self.global_batch_size} is not reachable with dp={par.dp}: "
                f"every data-parallel rank needs at least one sample",
            )
        smallest_share = self.global_batch_size // par.dp
        if self.micro_batch_size > smallest_share:
            _fail(
                "micro_batch_size",
                f"micro-batch {self.micro_batch_size} is larger than a data-parallel share "
                f"({self.global_batch_size} // dp={par.dp} = {smallest_share})",
            )
        if self.data.kind == "synthetic" and self.data.num_samples < self.global_batch_size:
            _fail(
                "data.num_samples",
                f"must be >= global_batch_size={self.global_batch_size}, got {self.data.num_samples}",
            )
        el = self.elastic
        max_workers = el.max_workers or res.workers
        if el.min_workers > res.workers:
            _fail("elastic.min_workers", f"must be <= resources.workers={res.workers}, got {el.min_workers}")
        if max_workers < res.workers:
            _fail("elastic.max_workers", f"must be >= resources.workers={res.workers} (or 0), got {el.max_workers}")

    @property
    def max_workers(self) -> int:
        return self.elastic.max_workers or self.resources.workers


def _at_most(path: str, value: float, most: float) -> None:
    if value > most:
        _fail(path, f"must be <= {most}, got {value}")


def _positive(path: str, value: int) -> None:
    if value < 1:
        _fail(path, f"must be >= 1, got {value}")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _build(cls: type, data: Any, path: str) -> Any:
    """Strictly convert a mapping into dataclass ``cls`` (unknown keys refused)."""
    if data is None:
        data = {}
    expand = getattr(cls, "expand_preset", None)
    if expand is not None:
        data = expand(data, path)
    if not isinstance(data, dict):
        _fail(path, f"must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        _fail(f"{path}.{unknown[0]}" if path != "spec" else unknown[0],
              f"unknown option; known: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = key if path == "spec" else f"{path}.{key}"
        kwargs[key] = _coerce(fields[key], value, sub)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, path: str) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, path)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {_short(value)!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail(path, f"must be an integer, got {_short(value)!r}")
        try:
            return int(value)
        except ValueError:
            _fail(path, f"must be an integer, got {_short(value)!r}")
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail(path, f"must be a number, got {_short(value)!r}")
        try:
            number = float(value)
        except ValueError:
            _fail(path, f"must be a number, got {_short(value)!r}")
        # NaN passes every `< 0` check and inf breaks JSON: found by tests/security/test_security_fuzz.py
        if not math.isfinite(number):
            _fail(path, f"must be a finite number, got {_short(value)!r}")
        return number
    if isinstance(default, str):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # e.g. snapshot_every: 5
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {_short(value)!r}")
        limit = MAX_PATH_LEN if path.endswith(("path", ".init_from")) else MAX_STRING_LEN
        if len(value) > limit:
            _fail(path, f"longer than {limit} characters")
        return value
    raise TypeError(f"unsupported field type at {path}")  # programming error, not input
