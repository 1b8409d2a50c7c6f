"""Disk checkpoints: per-rank torch.distributed.checkpoint saves of a flat snapshot, written
on a background thread, loadable into any later layout (the last resort of a recovery)."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from trainer.decisions import named_pieces
from trainer.reshard import Holding, plan_transfers
from trainer.snapshot import Snapshot, chunk_checksums
from trainer.transfer import Unrecoverable

log = logging.getLogger(__name__)


def _dcp():
    # torch.distributed.checkpoint takes ~1 s to import: a worker without disk checkpoints never pays it
    import torch.distributed.checkpoint as dcp

    return dcp


class DiskCheckpoints:
    """Per-rank torch.distributed.checkpoint saves of a flat snapshot, loadable into any layout.

    Each rank writes ``root/step-S/gG-rR`` (``no_dist``: no collective,
    so a save never waits for a peer): its three flat tensors, then a ``done`` file
    with the snapshot's metadata (layout, rank) and checksums. A rank of any later
    layout reads the flat tensors of the ranks that held what it needs, checks them
    against the checksums, and cuts out its pieces (``named_pieces``)."""

    def __init__(self, root: str, model_spec, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep: must be >= 1 checkpoint, got {keep}")
        self.root = Path(root)
        """The job's checkpoint directory: on this node, or shared by every node (then any rank
        of a later layout reads every rank's files)."""
        self.model_spec = model_spec
        self.keep = keep
        """Checkpoints of this process kept on disk, newest first (older ones are deleted)."""
        self._written: list[Path] = []
        """What this process saved, oldest first: a process deletes only its own files, so a
        rank still writing (or a recovery reading) another rank's files is never raced."""
        self._queue: queue.Queue = queue.Queue()
        self.last_write_s = 0.0
        """Seconds the last checkpoint took (its copy and its write)."""
        self._idle_since = time.monotonic()
        self._thread = threading.Thread(target=self._writer, name="disk-checkpoints", daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot, *, generation: int, rank: int, step_lines: Sequence[dict] = ()) -> None:
        """Write ``snap`` on the writer thread: neither training nor replication waits. The
        snapshot is pinned only until the writer has its private copy (a memcpy), so the
        snapshotter, which wants the buffer back a step later, does not skip a step.
        ``step_lines``: the metrics rank's recent step lines, kept with the checkpoint
        (``step_lines``: a restore from it re-sends those its agent may not have relayed)."""
        snap.pin()
        self._queue.put((snap, generation, rank, list(step_lines)))

    def _writer(self) -> None:
        _dcp()  # the first import, here on the writer thread: not on a save's clock
        while True:
            snap, generation, rank, step_lines = self._queue.get()
            started = time.monotonic()
            try:
                copy = Snapshot(step=snap.step, tensors={k: t.clone() for k, t in snap.tensors.items()},
                                checksums=dict(snap.checksums), checksum_kind=snap.checksum_kind,
                                metadata=dict(snap.metadata), complete=True)
            finally:
                snap.unpin()
            try:
                self._written.append(self.save(copy, generation=generation, rank=rank, step_lines=step_lines))
                self._prune()
            except Exception as exc:  # a failed checkpoint is logged; in-memory snapshots still protect the job
                log.warning("disk checkpoint of step %d failed: %r", snap.step, exc)
            finally:
                self._idle_since = time.monotonic()
                self.last_write_s = self._idle_since - started
                self._queue.task_done()

    def _prune(self) -> None:
        """Delete this process's checkpoints beyond the newest ``keep`` (and a step folder left empty)."""
        while len(self._written) > self.keep:
            old = self._written.pop(0)
            shutil.rmtree(old, ignore_errors=True)
            try:
                old.parent.rmdir()  # only once no rank's checkpoint of that step is left
            except OSError:
                pass

    @property
    def idle(self) -> bool:
        """Nothing submitted is still waiting or being written."""
        return self._queue.unfinished_tasks == 0

    def rested(self, now: float | None = None) -> bool:
        """Idle for at least as long as the last checkpoint took: checkpoints taken whenever the
        writer has rested occupy it (its host copy, the disk) at most half the time, whatever
        the state's size (a small state: every step; 16 GB written in 20 s: one every 40 s)."""
        now = time.monotonic() if now is None else now
        return self.idle and now - self._idle_since >= self.last_write_s

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the checkpoints submitted so far to be on disk (False:
        some still are not). A recovery reading the disk first lets its own writes land: a
        checkpoint handed to the writer a step ago is one the job has."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def save(self, snap: Snapshot, *, generation: int, rank: int, step_lines: Sequence[dict] = ()) -> Path:
        path = self.root / f"step-{snap.step:08d}" / f"g{generation}-r{rank}"
        path.mkdir(parents=True, exist_ok=True)
        dcp = _dcp()
        dcp.save(dict(snap.tensors), storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
        done = {"step": snap.step, "metadata": snap.metadata, "checksums": snap.checksums,
                "checksum_kind": snap.checksum_kind,
                "numel": {kind: t.numel() for kind, t in snap.tensors.items()}}
        if step_lines:
            done["step_lines"] = [line for line in step_lines if int(line.get("step", 0)) <= snap.step]
        (path / "done").write_text(json.dumps(done))
        return path

    def step_lines(self, step: int) -> list[dict]:
        """The step lines kept with the checkpoint of ``step`` (any rank's: they carry the same
        all-reduced loss), oldest first, one per step."""
        by_step: dict[int, dict] = {}
        step_dir = self.root / f"step-{step:08d}"
        for _, done in self._saved(step_dir) if step_dir.is_dir() else []:
            for line in done.get("step_lines", []):
                by_step.setdefault(int(line["step"]), line)
        return [by_step[s] for s in sorted(by_step)]

    def _saved(self, step_dir: Path) -> list[tuple[Path, dict]]:
        out = []
        for rank_dir in sorted(step_dir.iterdir()):
            try:
                out.append((rank_dir, json.loads((rank_dir / "done").read_text())))
            except (OSError, ValueError):
                continue  # not complete (the rank died while saving)
        return out

    def steps_covering(self, needs: Mapping[str, Sequence[tuple[int, int]]]) -> list[int]:
        if not self.root.exists():
            return []
        out = []
        for step_dir in self.root.glob("step-*"):
            holdings = [Holding(rank=0, name=key, start=a, end=b)
                        for _, done in self._saved(step_dir)
                        for _, key, a, b, _ in named_pieces(self.model_spec, done["metadata"])]
            transfers, _ = plan_transfers({0: needs}, holdings)
            if transfers is not None:
                out.append(int(step_dir.name.split("-")[1]))
        return out

    def load(self, step: int, needs: Mapping[str, Sequence[tuple[int, int]]]) -> tuple[dict[str, torch.Tensor], int]:
        """({"kind/name": tensor of my needed span}, bytes read); Unrecoverable if a file is corrupt."""
        out = {name: torch.empty(spans[0][1] - spans[0][0]) for name, spans in needs.items()}
        read = 0
        for rank_dir, done in self._saved(self.root / f"step-{step:08d}"):
            wanted = [p for p in named_pieces(self.model_spec, done["metadata"])
                      if p[1] in needs and p[2] < needs[p[1]][0][1] and p[3] > needs[p[1]][0][0]]
            if not wanted:
                continue
            flat = {kind: torch.empty(n) for kind, n in done["numel"].items()}
            dcp = _dcp()
            dcp.load(flat, storage_reader=dcp.FileSystemReader(str(rank_dir)), no_dist=True)
            for kind, t in flat.items():
                if chunk_checksums(t, done.get("checksum_kind", "crc32")) != list(done["checksums"].get(kind, [])):
                    raise Unrecoverable(f"disk checkpoint {rank_dir}: {kind} does not match its checksum")
                read += t.numel() * t.element_size()
            for kind, key, a, b, offset in wanted:
                lo, hi = needs[key][0]
                x, y = max(a, lo), min(b, hi)
                out[key][x - lo:y - lo].copy_(flat[kind][offset + x - a:offset + y - a])
        return out, read
