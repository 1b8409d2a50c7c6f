"""One generation's communicators: the abortable rendezvous of a plan generation under its
store prefix, its abort watcher and its buddy replication; and the step-line decoration
with the recoverable step (``RecoverableMetrics``)."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from protos.plan import Plan
from trainer import comm
from trainer.abort import (AbortSettings, AbortWatcher, CommAborted, CommFailed, connect_store, form_group,
                           generation_store)
from trainer.settings import ElasticSettings
from trainer.snapshot import Snapshotter
from trainer.train import backend_for
from common.layout import buddy_ring
from trainer.decisions import memory_covers_node_loss
from trainer.transfer import BuddyReplicator, ReplicationSettings


class StoreUnreachable(RuntimeError):
    """The generation's rendezvous store cannot be reached (its node may be gone)."""


Interruptions = (CommAborted, CommFailed, TimeoutError, dist.DistError)
"""What a generation ends with when a peer dies or hangs, or the plan changes."""


class Generation:
    """The communicators of one plan generation: default group, abort watcher, replication."""

    def __init__(self, plan: Plan, rank: int | None, settings: ElasticSettings, device: torch.device,
                 *, replicate: bool = True, prefix: str | None = None, world_size: int | None = None) -> None:
        self.plan, self.rank, self.settings, self.device = plan, rank, settings, device
        self.replicate = replicate
        self.prefix = plan.store_prefix if prefix is None else prefix
        self.world_size = plan.world_size if world_size is None else world_size
        self.watcher: AbortWatcher | None = None
        self.ring = buddy_ring({w.rank: w.node for w in plan.workers}) if replicate and rank is not None else {}
        """{rank: buddy} of the generation, empty when it does not replicate."""
        self.memory_covers_node = bool(self.ring) and memory_covers_node_loss(plan)
        """True when the in-memory replicas survive the loss of any one node (else every snapshot
        the disk writer can take goes to disk as well: ``disk_checkpoint_due``)."""
        self.replicator: BuddyReplicator | None = None
        self.checkpointed = -1
        """Step of the last snapshot handed to the disk writer."""
        self.first_step = 0
        self.last_step_s: float | None = None
        self.step_times: dict[int, float] = {}
        """step -> its step_time (seconds), for ``snapshot_every: auto`` (the probe's steps)."""
        self.boundary_wall_s: dict[int, float] = {}
        """step -> wall time of the snapshot boundary after it (seconds)."""
        self.replication_posted = False
        """True once the generation's first replication round was posted."""
        self.snapshot_every: int | None = None
        """The interval ``auto`` picked in this generation (None: not yet, or a fixed one)."""
        self.boundary_cpu_s: float | None = None
        """CPU time of the training thread in the last snapshot boundary (seconds), for the
        next step line (``boundary_cpu_s``)."""
        self.trained = False
        """True once this generation has its state (fresh start or restored) and trains."""

    def form(self, should_abort=None, on_arrive=None) -> AbortWatcher:
        """Rendezvous (abortable: ``should_abort()`` -> a reason to give up, see
        trainer.abort.rendezvous), then the watcher (replication: ``replicator_at_boundary``)."""
        host, _, port = self.plan.store_address.rpartition(":")
        timeout_s = self.settings.store_timeout_s
        try:
            # abortable: the store may have gone with a lost node, and the controller re-plans
            # meanwhile (a newer plan that switches now ends this wait at once)
            store = connect_store(host, int(port), timeout_s=timeout_s, should_abort=should_abort)
        except CommAborted:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises several types; not an interruption of training
            raise StoreUnreachable(f"cannot reach the rendezvous store at {self.plan.store_address} "
                                   f"within {timeout_s:.0f}s: {exc}") from None
        backend = backend_for(self.device, self.settings.worker.backend)
        form_group(store, self.prefix, rank=self.rank, world_size=self.world_size,
                   backend=backend, timeout_s=self.settings.collective_timeout_s,
                   device_id=self.device if self.device.type == "cuda" else None, should_abort=should_abort,
                   on_arrive=on_arrive)
        self.watcher = AbortWatcher(AbortSettings(collective_timeout_s=self.settings.collective_timeout_s,
                                                  sliced_waits=backend == "gloo"), rank=self.rank)
        self.watcher.register(dist.group.WORLD)
        # its own connection, short timeout: the abort key is read from inside a wait, so a
        # store host that hangs must not hold the wait longer than a few seconds
        self.watcher.watch_store(generation_store(host, int(port), self.prefix,
                                                  timeout_s=min(5.0, self.settings.store_timeout_s)))
        comm.set_waiter(self.watcher.wait, post_failed=self.watcher.failed)
        return self.watcher

    @property
    def replicating(self) -> bool:
        return bool(self.ring)

    def replicator_at_boundary(self) -> BuddyReplicator | None:
        """The generation's replicator, made at its first snapshot boundary, which every rank of
        the generation reaches after the same step (making the pair groups is collective).
        Not in ``form``: a recovery should not wait for groups its first step does not use.
        Like the gloo connect of ``form_group``, this connect is bounded by the collective
        timeout only; a peer that dies inside the step before it fails that step's
        collectives first, so the window is the moment between a step and its boundary."""
        if self.replicator is None and self.replicating:
            self.replicator = BuddyReplicator.for_ring(
                self.ring, self.rank, wait=self.watcher.wait, wait_event=self.watcher.wait_for,
                settings=ReplicationSettings(timeout_s=self.settings.collective_timeout_s,
                                             pin_memory=self.device.type == "cuda" and torch.cuda.is_available()))
        return self.replicator

    def close(self) -> None:
        comm.set_waiter(None)
        if self.replicator is not None:
            self.replicator.close()
        if self.watcher is not None:
            self.watcher.close()


class RecoverableMetrics:
    """Adds the recoverable step to every step line: the step of the replica this rank holds for
    its ward (without replication: its own latest snapshot). Every rank holds exactly one ward's
    replica, so the minimum over the ranks — what the controller takes — is the step the job can
    recover to (copies are verified at use: one that rotted in memory is caught then)."""

    def __init__(self, inner, *, current: Callable[[], "Generation | None"], snapper: Snapshotter) -> None:
        self.inner, self.current, self.snapper = inner, current, snapper

    def write(self, record: dict) -> None:
        gen = self.current()
        if "step" in record:
            record["pid"] = os.getpid()  # lets the control side (and tests) see a survivor was never restarted
        if gen is not None and "step" in record:
            if gen.replicating:  # the ward's replica held here (one round behind); the job takes the min
                replica = gen.replicator.replica if gen.replicator is not None else None
                record["recoverable_step"] = replica.step if replica is not None else 0
                if gen.replicator is not None:  # rounds left out while a big one was moving
                    record["replication_skipped"] = gen.replicator.skipped
            else:
                latest = self.snapper.latest
                record["recoverable_step"] = latest.step if latest is not None else 0
            gen.last_step_s = record.get("step_time")
            if gen.last_step_s is not None and len(gen.step_times) < 16:  # the probe needs the first few
                gen.step_times[int(record["step"])] = float(gen.last_step_s)
            if gen.snapshot_every is not None:
                record["snapshot_every"] = gen.snapshot_every
            held = self.snapper.host_bytes()
            if held:  # host memory this rank keeps for in-memory copies (own snapshots, replicas)
                replicas = gen.replicator.host_bytes() if gen.replicator is not None else 0
                record["snapshot_host_bytes"] = held + replicas
                latest = self.snapper.latest
                if latest is not None and latest.nbytes:  # how many copies of this rank's state that is
                    record["snapshot_host_copies"] = round((held + replicas) / latest.nbytes, 2)
            if gen.boundary_cpu_s is not None:  # the boundary after the previous step
                record["boundary_cpu_s"], gen.boundary_cpu_s = gen.boundary_cpu_s, None
        self.inner.write(record)
