"""The worker's elastic runtime: survive a lost peer in process, reshard, resume.

State machine of one worker process (decisions are the pure functions below)::

                 launch plan g (generation 1, or > 1 for a worker that joins)
                                      │
                                      ▼
    ┌──────────────► FORMING(g) ── rendezvous of g under plan.store_prefix,
    │                    │          abort watcher on the generation's store,
    │                    │          replication group, Trainer for g's layout
    │                    ▼
    │          fresh start (step 0)  or  TRANSFERRING: every participant
    │                    │            advertises its verified copies (own
    │                    │            snapshots, buddy replicas; a joiner has
    │                    │            none), all pick the newest step every
    │                    │            needed slice has a copy of
    │                    │            (``choose_resume_step``), reshard_state
    │                    │            moves the slices (checksummed; a bad copy
    │                    │            is re-planned around), import_state.
    │                    │            No step covered, or Unrecoverable: load the
    │                    │            newest disk checkpoint that covers it.
    │                    ▼
    │                RUNNING(g) ── steps; after each (every ``snapshot_every``)
    │                    │          a host snapshot (inline for a small CPU state),
    │                    │          replicated to a buddy on another node by two
    │                    │          collectives that run during the next step, no
    │                    │          helper thread (``_snapshot_boundary``); disk
    │                    │          checkpoints every ``checkpoint_every``.
    │                    │
    │     ┌──────────────┼───────────────────────────┬────────────────────┐
    │     │ plan g+1 with switch_at_step = -1         │ plan g+1 with       │ last step
    │     │ seen by the PlanWatcher thread, or a      │ switch_at_step = S  │ done
    │     │ collective failed here (CommFailed ->     │ and step == S:      ▼
    │     │ abort key), or the abort key was set,     │ SWITCHING: sync   EXIT 0
    │     │ or a backstop timeout                     │ snapshot S, one
    │     ▼                                           │ replication round
    │  ABORTING: every blocked wait raises            │
    │  CommAborted (it reads abort() and the abort    │
    │  key between 20 ms slices); the old groups      │
    │  are retired, never destroyed                   │
    │     └──────────────┬───────────────────────────┘
    │                    ▼
    │                REFORMING: wait (bounded) for a plan newer than g (plan file);
    │                    │      my new rank = the worker at my (node, slot);
    │                    │      listed in plan.extra["idle"] -> take part in the
    │                    │      transfer (group "<prefix>transfer/": the plan's
    │                    │      ranks, then the idle ones), then EXIT 0;
    │                    │      in neither (drained, dropped) -> EXIT 0
    └────────────────────┘

A failure while FORMING or TRANSFERRING goes back to REFORMING (a failure during
a recovery); the recovery record then covers the whole outage. The rendezvous of
FORMING is abortable (``trainer.abort.rendezvous``): while waiting for the other
ranks of g it polls the store and gives up at once (CommAborted -> REFORMING) when
a plan newer than g that switches now appears (a participant died before it
joined: the controller re-plans without it) or g's abort key is set; the
collective timeout is only the backstop.

A worker started for a two-phase growth (``TENAX_GROWTH_ID``, launched with the
tentative plan g+1 while the job still runs plan g) first PREPARES::

    PREPARING: imports, layout math, model stage build, store reachable
        │       -> JoinerRecord READY (ready file; the agent relays it)
        ▼
    WAIT FOR COMMIT (bounded, ``prepare_wait_s``): the first plan > g (plan file)
        ├─ names my (node, slot) -> FORMING(that plan) as a joiner (no state)
        └─ does not, or none in time (growth abandoned) -> EXIT 0

so that survivors, which switch at the step the controller picks once every
joiner is READY, wait at the boundary only for the rendezvous and the transfer.

Timing of a recovery (``protos.recovery.RecoveryRecord``) starts when the worker
notices (abort time, error time, or the switch boundary). The contract with the
control side (agents keep processes, start only new slots, fold the records) is
docs/elastic-worker.md.

Steady state never waits for the control plane (principle 2): plans arrive on a
watch thread, the loop only reads an attribute at each step boundary.
Every blocking call has a timeout: rendezvous, plan wait, collectives (through
the abort watcher), transfers, snapshot fences.

Fault injection for tests (``TENAX_FAULT``): trainer/faults.py. The parts: pure decisions
(trainer/decisions.py), the plan watch (trainer/plan_watch.py), one generation's
communicators (trainer/generation.py), state copies (trainer/copies.py), disk
checkpoints (trainer/checkpoints.py), TRANSFERRING (trainer/restore.py), PREPARING
(trainer/growth.py); settings from the launch environment (trainer/settings.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import psutil
import torch
import torch.distributed as dist

from common import comm_errors
from protos import launch
from protos.plan import Plan, is_metrics_rank
from protos.recovery import ARRIVAL_EVENT, RecoveryRecord
from trainer import comm
from trainer.abort import AbortWatcher, CommAborted, CommFailed
from trainer.checkpoints import DiskCheckpoints
from trainer.copies import Copies, flat_state
from trainer.decisions import (PROBE_CLEAN, PROBE_OVERLAPPED, PROBE_STEPS, auto_snapshot_interval, disk_checkpoint_due,
                               error_stops_generation, idle_survivors, probe_snapshot_due, rank_in_plan,
                               snapshot_metadata)
from trainer.faults import Fault, FaultInjector
from trainer.generation import Generation, Interruptions, RecoverableMetrics, StoreUnreachable
from trainer.gpu_release import device_pids, wait_for_exiting_neighbours
from trainer.growth import prepare_to_join, warm_up_layout_math
from trainer.parallel import ParallelLayout
from trainer.plan_watch import PlanWatcher
from trainer.restore import Restored, Resume, recovery_record, state_destinations, transfer_state
from trainer.settings import ElasticSettings
from trainer.snapshot import Snapshot, Snapshotter, SnapshotSettings
from trainer.train import Trainer
from trainer.transfer import gather_json

log = logging.getLogger(__name__)


@dataclass
class Stopped:
    """Why a generation ended (other than finishing)."""

    cause: str
    noticed: float
    """time.monotonic() when this worker noticed."""
    noticed_time: float
    at_step: int
    planned: Plan | None = None
    trained: bool = True
    """False if the generation ended before it could train (a failure during a recovery)."""
    comm_error: str = ""
    """The class of the communication failure that stopped it (common.comm_errors; "" for none)."""
    comm_error_detail: str = ""
    """The words of the exception (or of the peer's abort reason) that decided the class."""


class ElasticWorker:
    """Runs one worker through generations (see the module docstring)."""

    def __init__(self, spec, launch_plan: Plan, launch_rank: int, *, device: torch.device, metrics,
                 settings: ElasticSettings, plan_file: str = "", ready_file: str = "",
                 faults: Sequence[Fault] = (), growth_id: str = "") -> None:
        self.spec, self.device, self.metrics, self.settings = spec, device, metrics, settings
        self.launch_plan, self.launch_rank = launch_plan, launch_rank
        me = launch_plan.worker(launch_rank)
        self.node, self.slot = me.node, me.slot  # the launch plan is authoritative for where I run
        self.faults = FaultInjector(faults, run_dir=settings.run_dir)
        # three buffer sets: the replicator pins the step its buddy holds (trainer.transfer);
        # TENAX_SNAPSHOT_BUFFERS=2 caps host memory (a boundary whose buffer is pinned is skipped)
        self.snapper = Snapshotter(SnapshotSettings(buffers=settings.worker.snapshot_buffers,
                                                    fence_timeout_s=settings.collective_timeout_s))
        self.copies = Copies(self.snapper, spec.model)
        self.disk = (DiskCheckpoints(settings.checkpoint_root, spec.model, keep=settings.checkpoint_keep)
                     if settings.checkpoint_root and settings.checkpoint_every else None)
        self.generation = 0
        self.watcher: AbortWatcher | None = None
        self._watcher_lock = threading.Lock()
        self.plans: PlanWatcher | None = None
        self.ready_file = ready_file
        self.growth_id = growth_id
        """Set for a worker started for a two-phase growth: it prepares before it joins."""
        self._running_step: int | None = None
        """The step being run (None between generations); read by the plan watch thread (set
        before that thread starts: it may call ``_on_plan`` at once)."""
        if plan_file:
            self.plans = PlanWatcher(plan_file, on_plan=self._on_plan)
        self.snapshot_every = 1 if settings.snapshot_every == "auto" else int(settings.snapshot_every)
        """The interval in force; ``auto`` re-derives it in every generation (``_tune_snapshot_interval``)."""
        self.recoveries: list[RecoveryRecord] = []
        self._last_step = -1
        """Newest step this process committed (at_step of a recovery that fails before training)."""
        self._current_gen: Generation | None = None
        self._old_rank: dict[int, int] = {}
        """generation -> the rank this worker trained as in it (fault injection addresses old ranks)."""
        self._process_started = psutil.Process().create_time()
        self._arrived_before = False
        """True once this process reached a rendezvous (start-up is measured to the first one)."""
        threading.Thread(target=warm_up_layout_math, args=(spec.model,), name="warm-up", daemon=True).start()
        self.snapshots_on = settings.snapshots

    # --------------------------------------------------------------- driver
    def run(self) -> int:
        plan, rank = self.launch_plan, self.launch_rank
        if self.growth_id:
            if self.plans is None or not self.ready_file:
                raise RuntimeError(f"{launch.GROWTH_ID} needs {launch.PLAN_FILE} and {launch.READY_FILE}: "
                                   "a prepared worker says READY and waits for its plan")
            joined = prepare_to_join(self.spec, plan, rank, self.device, plans=self.plans, ready_file=self.ready_file,
                                     growth_id=self.growth_id, settings=self.settings)
            if joined is None:
                return 0  # the growth was abandoned, or a newer plan has no place for me
            plan, rank = joined
        resume: Resume | None = None
        if plan.generation > 1:  # started by the agent for a later generation: I join with no state
            resume = Resume(cause="join", reason=plan.reason, noticed=time.monotonic(), noticed_time=time.time(),
                            plan_wait_s=0.0, old_generation=0, old_layout="", at_step=-1)
        while True:
            stopped = self._run_generation(plan, rank, resume)
            if stopped is None:
                return 0  # trained to the end, or served my copies as an idle survivor
            if self.plans is None:
                raise RuntimeError(f"training interrupted ({stopped.cause}) and no plan file to read a new plan from")
            old_plan = plan
            plan = stopped.planned or self.plans.wait_newer(old_plan.generation, self.settings.plan_wait_s)
            plan_wait_s = time.monotonic() - stopped.noticed
            rank = rank_in_plan(plan, self.node, self.slot)
            if rank is None and (self.node, self.slot) not in idle_survivors(plan):
                log.warning("no place for %s/%d in generation %d: exiting", self.node, self.slot, plan.generation)
                return 0
            if resume is not None and not stopped.trained:
                # a failure during a recovery: one outage, timed from the first notice
                resume = dataclasses.replace(resume, cause=f"{resume.cause}+{stopped.cause}", reason=plan.reason,
                                             plan_wait_s=time.monotonic() - resume.noticed,
                                             comm_error=resume.comm_error or stopped.comm_error,
                                             comm_error_detail=resume.comm_error_detail or stopped.comm_error_detail)
            else:
                resume = Resume(cause=stopped.cause, reason=plan.reason, noticed=stopped.noticed,
                                noticed_time=stopped.noticed_time, plan_wait_s=plan_wait_s,
                                old_generation=old_plan.generation,
                                old_layout=f"dp{old_plan.dp}pp{old_plan.pp}z{old_plan.zero_stage}",
                                at_step=stopped.at_step, comm_error=stopped.comm_error,
                                comm_error_detail=stopped.comm_error_detail)

    def _on_plan(self, plan: Plan) -> None:
        """Watch thread: a newer plan aborts the running generation if it switches now, or if
        its switch step is already behind the step this worker is running (it saw the plan
        too late to stop at the boundary; its peers did and left)."""
        with self._watcher_lock:
            watcher, generation = self.watcher, self.generation
        running = self._running_step  # read after ``newest`` was published (see _train)
        late = plan.switch_at_step >= 0 and running is not None and running > plan.switch_at_step
        if watcher is not None and plan.generation > generation and (plan.switch_at_step < 0 or late):
            watcher.abort(f"plan generation {plan.generation}: {plan.reason}")

    def _switch_now_plan(self, generation: int) -> str | None:
        """The reason to give up forming ``generation``: a newer plan that switches now (the
        controller re-planned around a participant that died, maybe before it joined)."""
        newest = self.plans.newest if self.plans is not None else None
        if newest is not None and newest.generation > generation and newest.switch_at_step < 0:
            return f"plan generation {newest.generation} appeared while forming: {newest.reason}"
        return None

    def _pending_switch(self) -> Plan | None:
        newest = self.plans.newest if self.plans is not None else None
        if newest is not None and newest.generation > self.generation and newest.switch_at_step >= 0:
            return newest
        return None

    # ------------------------------------------------------- one generation
    def _run_generation(self, plan: Plan, rank: int | None, resume: Resume | None) -> Stopped | None:
        """FORMING -> (TRANSFERRING) -> RUNNING; None when training is done (or I was an idle
        survivor that only served its copies). ``rank`` is None for an idle survivor."""
        layout = ParallelLayout.from_plan(plan, micro_batch_size=self.spec.micro_batch_size)
        idle = idle_survivors(plan)
        gen = Generation(plan, rank, self.settings, self.device, replicate=self.snapshots_on)
        trainer = None
        restored: Restored | None = None
        try:
            gpu_wait_s = self._wait_for_gpu_release() if resume is not None else 0.0
            started = time.monotonic()
            if resume is not None and idle:
                # Idle survivors may hold the only good copy of a slice: they take part in
                # the transfer (ranks world.. of a transfer group), then leave; the training
                # ranks form the generation's own group afterwards.
                restored = self._transfer_with_idle(plan, rank, layout, resume, idle)
                if rank is None:
                    return None
                started = time.monotonic()
            watcher = self._form(gen)
            layout = ParallelLayout.from_plan(plan, micro_batch_size=self.spec.micro_batch_size)
            trainer = Trainer(self.spec, layout, rank, device=self.device, generation=plan.generation,
                              metrics=RecoverableMetrics(self.metrics, current=lambda: self._current_gen,
                                                         snapper=self.snapper),
                              settings=self.settings.worker, init=resume is None)
            rebuild_s = time.monotonic() - started
            if resume is not None:
                if restored is None:
                    restored = self._transfer(plan.generation, gen.rank, layout, resume, watcher.wait,
                                              into=state_destinations(trainer))
                else:
                    rebuild_s += restored.rebuild_s
                self._resume(trainer, restored, resume, rebuild_s, gpu_wait_s)
            return self._train(gen, trainer)
        except Interruptions as exc:
            return self._stopped(gen, trainer, exc)
        except StoreUnreachable as exc:
            if resume is None or self.plans is None:  # a bad launch: fail fast (exit 1)
                raise
            return self._stopped(gen, trainer, exc)  # mid-recovery: the next plan may move the store
        except Exception as exc:
            aborted = gen.watcher is not None and gen.watcher.check_store()  # e.g. a gloo error after the abort
            stop, why = error_stops_generation(str(exc), formed=gen.watcher is not None, aborted=aborted)
            if stop:
                log.warning("rank %s generation %d: %s: %s", gen.rank, gen.plan.generation, type(exc).__name__, why)
                return self._stopped(gen, trainer, exc)
            raise
        finally:
            self._running_step = None
            comm.set_send_delays({})  # injected delays name ranks of this generation only
            if gen.replicator is not None:
                # Its replicas stay available (``Copies``): both buffers — the newest replica may
                # be one step ahead of what a pipeline neighbour committed (it failed in the
                # step's last all-gather) — and a round that arrived but was never finished.
                gen.replicator.close()
                self.copies.keep_replicas_of(gen.replicator)
            gen.close()
            with self._watcher_lock:
                self.watcher = None

    def _form(self, gen: Generation) -> AbortWatcher:
        self.faults.before_rendezvous(gen.plan.generation, self.launch_plan.generation, gen.rank)
        watcher = gen.form(should_abort=lambda: self._switch_now_plan(gen.plan.generation),
                           on_arrive=lambda: self._arrived(gen.plan.generation, gen.rank))
        with self._watcher_lock:
            self.watcher, self.generation = watcher, gen.plan.generation
        self._current_gen = gen
        reason = self._switch_now_plan(gen.plan.generation)  # arrived between the rendezvous and now
        if reason is not None:
            watcher.abort(reason)
        return watcher

    def _arrived(self, generation: int, rank: int | None) -> None:
        """Tell the agent (a metrics line, protos/recovery.py ``ARRIVAL_EVENT``) that this worker
        reached the rendezvous of ``generation``: the controller abandons a generation whose
        participants do not all arrive in time (controller/rendezvous.py)."""
        now = time.time()
        record = {"event": ARRIVAL_EVENT, "generation": generation, "rank": -1 if rank is None else rank, "time": now}
        if not self._arrived_before and not self.growth_id:  # a joiner's start includes its wait for the commit
            record["startup_s"] = round(max(now - self._process_started, 0.0), 3)
        self._arrived_before = True
        try:
            self.metrics.write(record)
        except OSError as exc:  # the deadline then waits for the first step instead
            log.warning("rendezvous arrival not written: %r", exc)

    def _transfer_with_idle(self, plan: Plan, rank: int | None, layout, resume: Resume,
                            idle: list[tuple[str, int]]) -> Restored:
        """TRANSFERRING in a group of the plan's workers plus its idle survivors."""
        started = time.monotonic()
        me = rank if rank is not None else plan.world_size + idle.index((self.node, self.slot))
        xfer = Generation(plan, me, self.settings, self.device, replicate=False,
                          prefix=f"{plan.store_prefix}transfer/", world_size=plan.world_size + len(idle))
        try:
            watcher = self._form(xfer)
            rebuild_s = time.monotonic() - started
            restored = self._transfer(plan.generation, me, layout, resume, watcher.wait)
            restored.rebuild_s = rebuild_s
            return restored
        finally:
            xfer.close()
            with self._watcher_lock:
                self.watcher = None

    def _stopped(self, gen: Generation, trainer, exc: BaseException) -> Stopped:
        watcher = gen.watcher
        if watcher is not None and not watcher.aborted:
            watcher.signal_peers(f"rank {gen.rank}: {type(exc).__name__}: {str(exc)[:200]}")
        cause = {CommAborted: "comm-aborted", CommFailed: "comm-failed", TimeoutError: "timeout",
                 StoreUnreachable: "store-unreachable"}.get(
            type(exc), "comm-failed")
        comm_error, detail = "", ""
        if watcher is not None and watcher.reason.startswith("plan generation"):
            cause = "plan"
        elif not isinstance(exc, StoreUnreachable):
            # CommAborted's text holds the abort key's reason: the exception a peer saw
            comm_error, detail = comm_errors.classify(str(exc))
        noticed = watcher.aborted_at if watcher is not None and watcher.aborted_at else time.monotonic()
        noticed_time = time.time() - (time.monotonic() - noticed)
        at_step = trainer.step if trainer is not None else self._last_step
        log.warning("rank %s generation %d stopped at step %d: %s", gen.rank, gen.plan.generation, at_step, exc)
        return Stopped(cause=cause, noticed=noticed, noticed_time=noticed_time, at_step=at_step,
                       trained=gen.trained, comm_error=comm_error, comm_error_detail=detail)

    # ------------------------------------------------------------ TRANSFERRING
    def _transfer(self, generation: int, rank: int, layout, resume: Resume, wait, into=None) -> Restored:
        """TRANSFERRING over the current default group (trainer.restore), after the test hooks;
        ``into``: the trainer's state tensors, to restore in place."""
        started = time.monotonic()
        self.faults.at_transfer(generation, rank, resume.old_generation,
                                self._old_rank.get(resume.old_generation, -1), self.copies)
        return transfer_state(model_spec=self.spec.model, rank=rank, layout=layout, resume=resume, wait=wait,
                              snapper=self.snapper, copies=self.copies, disk=self.disk, settings=self.settings,
                              started=started, into=into)

    def _wait_for_gpu_release(self) -> float:
        """Before a recovery allocates: seconds waited for processes exiting on this GPU."""
        if self.device.type != "cuda":
            return 0.0
        with device_pids(self.device) as pids:
            waited, stuck = wait_for_exiting_neighbours(pids, timeout_s=self.settings.gpu_release_wait_s)
        if waited > 0.01:
            log.warning("waited %.2f s for the GPU memory of exiting processes on this device%s", waited,
                        f" (still exiting: {stuck})" if stuck else "")
        return waited

    def _resume(self, trainer, restored: Restored, resume: Resume, rebuild_s: float, gpu_wait_s: float) -> None:
        if restored.in_place:
            trainer.resume_at(restored.step)
        elif restored.tensors is not None:
            trainer.import_state({"tensors": restored.tensors, "step": restored.step,
                                  "committed_step": restored.step})
        else:  # no copy at all: the job starts over from the initial state (step 0)
            trainer.apply_init()
        self._last_step = restored.step
        record = recovery_record(trainer, restored, resume, rebuild_s, gpu_wait_s)
        self.recoveries.append(record)
        self.metrics.write(record.to_dict())
        if restored.from_disk and self.disk is not None and \
                is_metrics_rank(trainer.dp_rank, trainer.pp_rank, trainer.layout.pp):
            # the steps up to the checkpoint are not redone: if the metrics rank that trained
            # them was lost before its agent relayed them, only these lines still tell them
            for line in self.disk.step_lines(restored.step):
                self.metrics.write({**line, "replayed": True})

    # ----------------------------------------------------------------- RUNNING
    def _train(self, gen: Generation, trainer) -> Stopped | None:
        self._old_rank[gen.plan.generation] = gen.rank
        views = flat_state(trainer)
        meta = snapshot_metadata(trainer.layout, gen.rank, gen.plan.generation)
        trainer.before_update = self.snapper.fence
        # every rank says in the step's all-reduce whether its replication round still moves;
        # any -> all skip that boundary's round (rounds on both ends of a pair stay matched)
        trainer.vote = lambda: 1 if gen.replicator is not None and gen.replicator.busy else 0
        kill = self.faults.kill_at(gen.plan.generation, gen.rank)
        delays = self.faults.send_delays(gen.plan.generation, gen.rank)
        alloc = self.faults.alloc_at(gen.plan.generation, gen.rank)
        gen.first_step = trainer.step
        gen.trained = True
        threading.Thread(target=warm_up_layout_math, args=(self.spec.model, trainer.layout),
                         name="warm-up", daemon=True).start()
        while trainer.step < self.spec.steps:
            # Publish the step about to run before looking for a planned switch; the watch
            # thread publishes the plan before looking at this: one of the two sees the other.
            self._running_step = trainer.step + 1
            planned = self._pending_switch()
            if planned is not None and trainer.step >= planned.switch_at_step:
                self._running_step = None
                return self._switch(gen, trainer, planned, views, meta)
            if kill is not None and trainer.step == kill.step:
                self.faults.fire_kill(kill, replicator=gen.replicator, disk=self.disk,
                                      flush_timeout_s=self.settings.collective_timeout_s)
            if delays:
                comm.set_send_delays({p: s for p, (s, first) in delays.items() if trainer.step + 1 >= first})
            if alloc is not None and trainer.step == alloc.step:
                self.faults.fire_alloc(alloc)
            trainer.train_step()
            self._last_step = trainer.step
            if self.snapshots_on and self._snapshot_due(gen, trainer.step):
                self._snapshot_boundary(gen, trainer.step, views, meta, round_moving=trainer.votes > 0)
                self._tune_snapshot_interval(gen, trainer)
        self._running_step = None
        comm.wait(dist.barrier(async_op=True), "final barrier")
        return None

    def _snapshot_boundary(self, gen: Generation, step: int, views, meta, *, round_moving: bool = False) -> None:
        """After a committed step, all on the training thread and without waiting in steady
        state: finish the replication round of the previous boundary (a step later it is
        done), snapshot (inline for a small CPU state), hand a due disk checkpoint to its
        writer, and post this boundary's round. ``round_moving``: some rank's (big) round
        is still moving, so every rank leaves this boundary out, its snapshot included: the
        own snapshots must stay at the steps the rounds carry, or a recovery would find no
        step that its own copies and the buddies' replicas both cover."""
        cpu_started = time.thread_time()
        try:
            replicator = gen.replicator_at_boundary()
            if replicator is not None and round_moving:
                replicator.skipped += 1
                return
            if replicator is not None:
                replicator.complete()  # first: the older step it held pinned is free again for begin()
            self.snapper.begin(step, views, meta)
            if replicator is not None and not gen.replication_posted:
                # the generation's first round carries this snapshot, not an older one (or none):
                # its layout becomes the pair's terms (a round that changes them carries nothing)
                self.snapper.wait(self.settings.collective_timeout_s)
            latest = self.snapper.latest  # on the background path (CUDA), the previous step's
            self._checkpoint(gen, latest)
            posted = time.perf_counter()
            if replicator is not None:
                replicator.post(latest)
                gen.replication_posted = True
            # what this snapshot cost the training thread (not the one-off making of the pair groups)
            gen.boundary_wall_s[step] = self.snapper.stats.last_begin_s + time.perf_counter() - posted
        finally:
            gen.boundary_cpu_s = time.thread_time() - cpu_started

    def _checkpoint(self, gen: Generation, latest: Snapshot | None) -> None:
        """The snapshot goes to disk when ``disk_checkpoint_due`` says so: every ``checkpoint_every``
        steps, and every snapshot the writer can take while memory does not survive a node loss
        (a background snapshot not complete yet at its boundary goes at the next one)."""
        if self.disk is None or latest is None:
            return
        due, _ = disk_checkpoint_due(latest.step, every=self.settings.checkpoint_every, last=gen.checkpointed,
                                     memory_covers_node=gen.memory_covers_node, writer_rested=self.disk.rested())
        if not due:
            return
        gen.checkpointed = latest.step
        me = gen.plan.worker(gen.rank)
        lines = getattr(self.metrics, "recent", ()) if is_metrics_rank(me.dp_rank, me.pp_rank, gen.plan.pp) else ()
        self.disk.submit(latest, generation=gen.plan.generation, rank=gen.rank, step_lines=lines)

    def _switch(self, gen: Generation, trainer, planned: Plan, views, meta) -> Stopped:
        """SWITCHING: the state of step S is snapshotted and replicated before anyone moves."""
        noticed, noticed_time = time.monotonic(), time.time()
        timeout_s = self.settings.collective_timeout_s
        # The replicator exists if this generation passed a snapshot boundary (all ranks alike);
        # before the first one nothing of this generation is replicated and nobody is lost in a
        # planned switch: the transfer uses the own snapshots.
        replicator = gen.replicator
        if replicator is not None:
            replicator.complete()  # the last boundary's round: no buffer is pinned any more
        snap = self.snapper.wait(timeout_s)
        if snap is None or snap.step != trainer.step:  # skipped (buffer busy) or not due: take it now
            self.snapper.take(trainer.step, views, meta, timeout_s=timeout_s)
        if replicator is not None:
            # one more round on every rank (rounds must match), finished on every rank: each
            # buddy holds step S when we leave
            replicator.post(self.snapper.latest)
            replicator.complete()
        return Stopped(cause="switch", noticed=noticed, noticed_time=noticed_time, at_step=trainer.step,
                       planned=planned)

    def _snapshot_due(self, gen: Generation, step: int) -> bool:
        """After committed ``step``: a snapshot boundary? ``auto``: the probe's boundaries during
        the first PROBE_STEPS steps of a generation (every rank alike), then every
        ``snapshot_every``-th step."""
        offset = step - gen.first_step
        if self.settings.snapshot_every == "auto" and offset <= PROBE_STEPS:
            return probe_snapshot_due(offset)
        return step % self.snapshot_every == 0

    def _tune_snapshot_interval(self, gen: Generation, trainer) -> None:
        """``snapshot_every: auto``: at the probe's last boundary every rank derives the interval
        from its measured times (``auto_snapshot_interval``) and all take the largest. Each
        generation probes again: a new layout has its own step and copy times."""
        first = gen.first_step
        if self.settings.snapshot_every != "auto" or trainer.step != first + PROBE_STEPS:
            return
        stats, times = self.snapper.stats, gen.step_times
        clean_s = times.get(first + PROBE_CLEAN, 0.0)  # no copy in flight during it
        overlapped_s = times.get(first + PROBE_OVERLAPPED, clean_s)  # ran next to the copy of the step before
        stall_s = gen.boundary_wall_s.get(first + PROBE_OVERLAPPED - 1, 0.0)
        if not stats.last_inline:  # a background copy slowed the step it overlapped by this much
            stall_s += max(0.0, overlapped_s - clean_s)
        waited = gen.replicator.max_wait_s if gen.replicator is not None else 0.0
        copy_s = stats.last_copy_s + stats.last_checksum_s
        mine = auto_snapshot_interval(copy_s, clean_s, waited, stall_s)
        self.snapshot_every = gen.snapshot_every = max(gather_json(mine, wait=gen.watcher.wait))
        log.info("rank %d generation %d: snapshot_every auto -> %d (copy %.4f s, step %.4f s, stall %.4f s, "
                 "replication wait %.4f s; this rank alone: %d)", gen.rank, gen.plan.generation, self.snapshot_every,
                 copy_s, clean_s, stall_s, waited, mine)
