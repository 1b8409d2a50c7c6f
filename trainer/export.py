"""Whole-model weights from a job's disk checkpoints, whatever layout wrote them.

A disk checkpoint of step S is one directory per rank, ``checkpoints/step-S/gG-rR``
(trainer.elastic.DiskCheckpoints), each holding that rank's owned range of its
stage's flat parameters and a ``done`` file naming the layout. On a cluster the
ranks of one step write under their own node's run directory, so a step is
gathered from every root given. The newest step whose ranks together hold every
parameter (the latest recoverable one on disk) is the default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch


class ExportError(ValueError):
    """Nothing exportable: the message says what is missing."""


def checkpoint_root(source: str | Path) -> Path | None:
    """The ``checkpoints`` directory of a job, run or checkpoints directory (or a shared
    checkpoint directory of the job: ``step-*`` in it); None: it has none."""
    source = Path(source)
    for candidate in (source / "run" / "checkpoints", source / "checkpoints", source):
        if candidate.is_dir() and (candidate.name == "checkpoints" or any(candidate.glob("step-*"))):
            return candidate
    return None


def no_checkpoints(source: str | Path) -> ExportError:
    return ExportError(f"{source}: no checkpoints directory (a job needs elastic.checkpoint_every > 0)")


def checkpoint_roots(sources: Iterable[str | Path]) -> list[Path]:
    """The ``checkpoints`` directories under the given job, run or checkpoints directories."""
    roots = []
    for source in map(Path, sources):
        root = checkpoint_root(source)
        if root is None:
            raise no_checkpoints(source)
        roots.append(root)
    return roots


def find_spec(sources: Iterable[str | Path]):
    """The JobSpec of the newest launch file (``launch-g*-r*.json``) in the given job directories."""
    from common.spec import JobSpec

    launches = [p for s in map(Path, sources) for d in (s, s.parent) for p in d.glob("launch*.json")]
    if not launches:
        raise ExportError("no launch file (launch-*.json) next to the checkpoints: pass --spec JOB.yaml")
    newest = max(launches, key=lambda p: p.stat().st_mtime)
    return JobSpec.from_dict(json.loads(newest.read_text())["spec"])


def _saved(roots: list[Path], step: int) -> list[tuple[Path, dict]]:
    out = []
    for root in roots:
        step_dir = root / f"step-{step:08d}"
        if not step_dir.is_dir():
            continue
        for rank_dir in sorted(step_dir.iterdir()):
            try:
                out.append((rank_dir, json.loads((rank_dir / "done").read_text())))
            except (OSError, ValueError):
                continue  # incomplete: the rank died while saving
    return out


def _param_pieces(model_spec, done: dict) -> list[tuple[str, int, int, int]]:
    """(param name, start, end, offset in the flat "param" tensor) saved by one rank."""
    from trainer.decisions import named_pieces

    return [(key.split("/", 1)[1], a, b, offset)
            for kind, key, a, b, offset in named_pieces(model_spec, done["metadata"]) if kind == "param"]


def _covers(model_spec, saved: list[tuple[Path, dict]], numels: dict[str, int]) -> bool:
    spans: dict[str, list[tuple[int, int]]] = {}
    for _, done in saved:
        for name, a, b, _ in _param_pieces(model_spec, done):
            spans.setdefault(name, []).append((a, b))
    for name, n in numels.items():
        reach = 0
        for a, b in sorted(spans.get(name, [])):
            if a > reach:
                return False
            reach = max(reach, b)
        if reach < n:
            return False
    return True


def latest_complete_step(model_spec, roots: list[Path]) -> int:
    from trainer.hf import full_model_shapes

    numels = {name: _numel(shape) for name, shape in full_model_shapes(model_spec).items()}
    steps = sorted({int(d.name.split("-")[1]) for r in roots for d in r.glob("step-*")}, reverse=True)
    for step in steps:
        if _covers(model_spec, _saved(roots, step), numels):
            return step
    raise ExportError(f"no step in {', '.join(map(str, roots))} has every parameter saved "
                      f"(steps found: {steps[:5] or 'none'})")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_full_params(model_spec, roots: list[Path], step: int) -> dict[str, torch.Tensor]:
    """{name: full tensor} of ``step``, each rank's file checked against its checksums."""
    import torch.distributed.checkpoint as dcp

    from trainer.hf import full_model_shapes
    from trainer.snapshot import chunk_checksums

    shapes = full_model_shapes(model_spec)
    out = {name: torch.empty(_numel(shape)) for name, shape in shapes.items()}
    saved = _saved(roots, step)
    if not _covers(model_spec, saved, {n: t.numel() for n, t in out.items()}):
        raise ExportError(f"step {step}: the saved ranks do not hold every parameter")
    for rank_dir, done in saved:
        flat = {"param": torch.empty(done["numel"]["param"])}
        dcp.load(flat, storage_reader=dcp.FileSystemReader(str(rank_dir)), no_dist=True)
        if chunk_checksums(flat["param"], done.get("checksum_kind", "crc32")) != list(done["checksums"]["param"]):
            raise ExportError(f"{rank_dir}: parameters do not match their checksum")
        for name, a, b, offset in _param_pieces(model_spec, done):
            out[name][a:b].copy_(flat["param"][offset:offset + b - a])
    return {name: t.view(shapes[name]) for name, t in out.items()}
