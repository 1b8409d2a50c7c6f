"""PREPARING and WAIT FOR COMMIT (trainer/elastic.py): what a worker started for a two-phase
growth does before its plan is final, so that the survivors wait at the switch only for the rendezvous and
the transfer; and the off-critical-path warm-up of the layout math every worker runs."""

from __future__ import annotations

import logging
import os
import time

import psutil
import torch

from common.files import write_atomic
from protos.plan import Plan
from protos.records import JoinerRecord
from trainer.abort import connect_store
from trainer.decisions import rank_in_plan
from trainer.generation import StoreUnreachable
from trainer.model import build_stage, stage_param_shapes
from trainer.parallel import ParallelLayout
from trainer.plan_watch import PlanWatcher
from trainer.settings import ElasticSettings
from trainer.sharding import state_layout

log = logging.getLogger(__name__)


def prepare_to_join(spec, launch: Plan, rank: int, device: torch.device, *, plans: PlanWatcher, ready_file: str,
                    growth_id: str, settings: ElasticSettings) -> tuple[Plan, int] | None:
    """PREPARING then WAIT FOR COMMIT (trainer/elastic.py): (plan to join, my rank in it), or
    None when no plan takes me in (exit 0)."""
    me = launch.worker(rank)
    warm_up(spec, launch, rank, device, store_timeout_s=settings.store_timeout_s)
    announce_ready(ready_file, growth_id=growth_id, node=me.node, slot=me.slot)
    try:
        plan = plans.wait_newer(launch.generation - 1, settings.prepare_wait_s)
    except TimeoutError:
        log.warning("growth %s: no plan generation %d within %.0f s (abandoned): exiting", growth_id,
                    launch.generation, settings.prepare_wait_s)
        return None
    mine = rank_in_plan(plan, me.node, me.slot)
    if mine is None:
        log.warning("growth %s: plan generation %d has no place for %s/%d: exiting", growth_id,
                    plan.generation, me.node, me.slot)
        return None
    log.info("growth %s: joining plan generation %d as rank %d", growth_id, plan.generation, mine)
    return plan, mine


def warm_up(spec, plan: Plan, rank: int, device: torch.device, *, store_timeout_s: float) -> None:
    """Everything a joiner can do before the plan is final: the slow first-time work of a
    fresh process (imports — at module level, before this —, lazy torch initialisation of
    every module kind, the layout math of the transfer, a CUDA context), and a check that
    the store answers (a joiner that cannot reach it fails now, and the growth is
    abandoned, instead of at the switch)."""
    layout = ParallelLayout.from_plan(plan, micro_batch_size=spec.micro_batch_size)
    state_layout(spec.model, layout)
    dp_rank, pp_rank = layout.coords(rank)
    stage = build_stage(spec.model, layers=layout.stage_layers(pp_rank), is_first=pp_rank == 0,
                        is_last=pp_rank == layout.pp - 1, device="meta")
    stage.to_empty(device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    host, _, port = plan.store_address.rpartition(":")
    try:
        connect_store(host, int(port), timeout_s=store_timeout_s)
    except Exception as exc:  # noqa: BLE001 - torch raises several types
        raise StoreUnreachable(f"cannot reach the rendezvous store at {plan.store_address}: {exc}") from None


def announce_ready(path: str, *, growth_id: str, node: str, slot: int) -> None:
    """READY in ``path`` (``TENAX_READY_FILE``); the agent relays it to etcd (Keys.job_joiner),
    and the controller switches once every joiner of the growth said so. A failure is logged:
    the growth then times out and is abandoned."""
    record = JoinerRecord(growth_id=growth_id, node=node, slot=slot, state="READY",
                          pid=os.getpid(), time=time.time(), prepare_s=process_age_s())
    try:
        write_atomic(path, record.to_json())
    except OSError as exc:  # the growth times out and is abandoned; I exit with it
        log.warning("growth %s: could not say READY: %r", growth_id, exc)
    else:
        log.info("growth %s: ready after %.2f s", growth_id, record.prepare_s)


def process_age_s() -> float:
    """Seconds since this process started (a joiner's READY reports its whole start-up)."""
    try:
        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - only informative
        return 0.0


def warm_up_layout_math(model_spec, layout=None) -> None:
    """Off the critical path: build every module type once on the meta device (the first
    meta construction of a kind a rank never built itself, e.g. the embedding for a
    last-stage rank, costs ~0.5-1 s of lazy torch initialisation), and with ``layout`` the
    stage shapes of every stage of it (memoised in trainer.model): a recovery from this
    layout cuts its copies with them, and a next layout that keeps the pipeline stages
    needs no new ones (``state_layout``/``named_pieces``)."""
    try:
        stage_param_shapes(model_spec, layers=range(0, 1), is_first=True, is_last=True)
        if layout is not None:
            state_layout(model_spec, layout)
    except Exception as exc:  # only an optimisation
        log.debug("warm-up failed: %r", exc)
