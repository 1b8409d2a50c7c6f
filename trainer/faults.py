"""Fault injection (test infrastructure, ``TENAX_FAULT``): ``;``-separated faults of
``key=value`` pairs, e.g. ``rank=3,step=4,kind=kill,when=mid``:

    kind=kill            SIGKILL this process at step boundary ``step`` (when=between)
                         or during the next step (when=mid), once ``step`` is replicated
                         (and due disk checkpoints written); when=posted: at that
                         boundary at once, its replication round still to move
    kind=corrupt-own     at recovery, flip a byte in each of this rank's own snapshots
    kind=corrupt-replica at recovery, flip a byte in each buddy replica it holds
    kind=kill-in-transfer SIGKILL at the start of the transfer of generation ``gen``
                         (``rank``: the rank in that generation's transfer group)
    kind=delay_send      every pipeline send of ``rank`` to global rank ``peer`` is posted
                         ``seconds`` late (a slow link or sending side: the sender's compute
                         is untouched, the receiver waits), from step ``step`` (default: all)
    kind=alloc,mb=N      at step boundary ``step``, allocate N MB (1e6 bytes) of host
                         memory, touch every page and hold it (the agent's memory limit)
    kind=hang-join       a process started for generation ``gen`` sleeps for ever before its
                         rendezvous of ``gen`` (alive, never arrives); ``rank=-1``: any rank
    ``rank`` is the rank in generation ``gen`` (default 1).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from trainer.snapshot import corrupt


@dataclass(kw_only=True, frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = -1
    gen: int = 1
    when: str = "between"
    peer: int = -1
    """delay_send: the global rank whose sends are delayed (in generation ``gen``)."""
    seconds: float = 0.0
    """delay_send: how late each send is posted (seconds)."""
    mb: int = 0
    """``alloc``: megabytes (1e6 bytes) to allocate and hold."""


def parse_faults(raw: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in raw.split(";"))):
        fields = dict(kv.split("=", 1) for kv in item.split(","))
        faults.append(Fault(kind=fields["kind"], rank=int(fields.get("rank", 1)), step=int(fields.get("step", -1)),
                            gen=int(fields.get("gen", 1)), when=fields.get("when", "between"),
                            peer=int(fields.get("peer", -1)), seconds=float(fields.get("seconds", 0.0)),
                            mb=int(fields.get("mb", 0))))
    for f in faults:
        if f.kind == "delay_send" and (f.peer < 0 or not f.seconds > 0):
            raise ValueError(f"delay_send: needs peer >= 0 and seconds > 0, got {f}")
    return faults


def kill_self(run_dir: str) -> None:
    """SIGKILL this process; the moment goes to ``run_dir``/killed-PID (benchmarks time MTTR from it)."""
    if run_dir:
        Path(run_dir, f"killed-{os.getpid()}").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


_held: list[bytes] = []
"""Memory an ``alloc`` fault holds until the process ends."""


class FaultInjector:
    """The faults of one worker process and the hooks the state machine calls (each fires once)."""

    def __init__(self, faults: Sequence[Fault], *, run_dir: str) -> None:
        self.faults = list(faults)
        self.run_dir = run_dir
        self._fired: set[Fault] = set()

    def alloc_at(self, generation: int, rank: int) -> Fault | None:
        """The ``alloc`` fault of ``rank`` in ``generation``, if any (``fire_alloc`` at its step)."""
        for f in self.faults:
            if f.kind == "alloc" and f.gen == generation and f.rank == rank and f not in self._fired:
                return f
        return None

    def fire_alloc(self, fault: Fault) -> None:
        """Allocate and hold the fault's memory (once)."""
        if fault not in self._fired:
            self._fired.add(fault)
            _held.append(b"\x01" * (fault.mb * 1_000_000))  # written, so every page is resident

    def kill_at(self, generation: int, rank: int) -> Fault | None:
        """The ``kill`` fault of ``rank`` in ``generation``, if any."""
        for f in self.faults:
            if f.kind == "kill" and f.gen == generation and f.rank == rank:
                return f
        return None

    def send_delays(self, generation: int, rank: int) -> dict[int, tuple[float, int]]:
        """peer -> (seconds each pipeline send to it is posted late, from step) for ``rank`` of
        ``generation`` (``delay_send`` faults; empty: none)."""
        return {f.peer: (f.seconds, f.step) for f in self.faults
                if f.kind == "delay_send" and f.gen == generation and f.rank == rank}

    def fire_kill(self, fault: Fault, *, replicator, disk, flush_timeout_s: float) -> None:
        """Die like a lost machine. ``when=between``/``mid``: once ``fault.step`` is recoverable
        as it is in steady state — the round that carries its snapshot completed here, so the
        buddy holds it, and the disk checkpoints due are written — either right here between
        steps or a little into the next step. ``when=posted``: at once, with the round this
        boundary posted still to move (the buddy may keep only the round before)."""
        if fault.when == "posted":
            kill_self(self.run_dir)
        if replicator is not None:
            replicator.complete()
        if disk is not None:  # as in steady state: the checkpoints due so far are on disk
            disk.flush(flush_timeout_s)
        if fault.when == "mid":
            threading.Timer(0.02, kill_self, args=(self.run_dir,)).start()
        else:
            kill_self(self.run_dir)

    def before_rendezvous(self, generation: int, launch_generation: int, rank: int | None) -> None:
        """Hook before a rendezvous: a ``hang-join`` fault of this generation, in a process
        started for it, never returns (a participant that never arrives)."""
        for f in self.faults:
            if f.kind == "hang-join" and f.gen == generation == launch_generation and f.rank in (-1, rank):
                if self.run_dir:
                    Path(self.run_dir, f"hang-join-{os.getpid()}").write_text(repr(time.time()))
                while True:
                    time.sleep(3600)

    def at_transfer(self, generation: int, rank: int, old_generation: int, old_rank: int, copies) -> None:
        """Hooks at the start of TRANSFERRING: die (a failure during a recovery), or let this
        process's copies (``trainer.copies.Copies``) rot in memory after their checksums were
        taken. ``old_rank``: the rank this process trained as in ``old_generation`` (-1: none)."""
        for f in self.faults:
            if f.kind == "kill-in-transfer" and f.gen == generation and f.rank == rank:
                kill_self(self.run_dir)
        for f in self.faults:
            if f.gen != old_generation or f.rank != old_rank or f in self._fired:
                continue
            self._fired.add(f)  # once: flipping the same byte again would repair it
            if f.kind == "corrupt-own":
                for snap in copies.own():
                    corrupt(snap, next(iter(sorted(snap.tensors))))
            elif f.kind == "corrupt-replica":
                for snap in copies.replicas:
                    corrupt(snap, next(iter(sorted(snap.tensors))))
