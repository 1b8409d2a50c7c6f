"""Plays the control side for elastic-runtime tests and benchmarks: no controller, no agent.

``ElasticJob`` serves the rendezvous TCPStore in this process (as an agent
does), writes plans to a real etcd (as the controller does, with
controller/replan.py deciding them) and relays them to the workers' plan file
(as the agent does), and starts ``python -m trainer.worker`` processes with the
launch-contract environment. Workers live on two pretend
nodes (``a``: ranks 0..world/2-1, ``b``: the rest) so buddies are off-node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.lifeline import open_lifeline  # noqa: E402
from common.procexit import dying_returncode  # noqa: E402
from common.etcd import Etcd  # noqa: E402
from common.files import write_atomic  # noqa: E402
from controller.replan import ClusterView, grow, replan  # noqa: E402
from protos import launch  # noqa: E402
from protos.keys import Keys  # noqa: E402
from protos.plan import Plan, WorkerAssignment  # noqa: E402
from common.spec import JobSpec  # noqa: E402
from common.layout import new_store_secret, partition_for_spec, store_prefix  # noqa: E402

PREFIX = "/tenax-test"


def _pythonpath() -> str:
    """The repo first, then whatever PYTHONPATH already holds (packages carried to a bench machine)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def tiny_spec(*, steps: int = 10, dp: int = 2, pp: int = 2, zero: int = 1, max_workers: int = 0,
              checkpoint_every: int = 0, snapshot_every: str = "1", **extra: Any) -> JobSpec:
    """A GPT small enough that a step takes tens of milliseconds on a loaded CPU."""
    return JobSpec.from_dict({
        "name": "elastic", "seed": 7, "steps": steps, "global_batch_size": 8, "micro_batch_size": 2,
        "model": {"layers": 4, "d_model": 32, "heads": 2, "vocab_size": 64, "seq_len": 16, "dropout": 0.1},
        "data": {"kind": "synthetic", "num_samples": 256},
        "optimizer": {"lr": 0.003, "warmup_steps": 2},
        "parallelism": {"dp": dp, "pp": pp, "zero_stage": zero},
        "elastic": {"min_workers": 1, "max_workers": max_workers, "snapshot_every": snapshot_every,
                    "checkpoint_every": checkpoint_every},
        "resources": {"workers": dp * pp, "device": "cpu"},
        **extra,
    })


def first_plan(spec: JobSpec, store_address: str, *, job: str = "job1", nodes: tuple[str, ...] = ("a", "b")) -> Plan:
    p = spec.parallelism
    world = p.dp * p.pp
    per_node = -(-world // len(nodes))
    workers = tuple(
        WorkerAssignment(rank=r, node=nodes[r // per_node], slot=r % per_node, dp_rank=r // p.pp, pp_rank=r % p.pp)
        for r in range(world)
    )
    base, extra = divmod(spec.global_batch_size, p.dp)
    return Plan(job_id=job, generation=1, workers=workers, dp=p.dp, pp=p.pp, zero_stage=p.zero_stage,
                layer_partition=tuple(partition_for_spec(spec.model, p.pp)),
                sample_shares=tuple(base + (1 if d < extra else 0) for d in range(p.dp)),
                store_address=store_address, store_prefix=store_prefix(job, 1, new_store_secret()), reason="submit")


def put(etcd_url: str, key: str, value: str) -> None:
    async def go() -> None:
        async with Etcd(etcd_url) as etcd:
            await etcd.put(key, value)
    asyncio.run(asyncio.wait_for(go(), 20))


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class ElasticJob:
    """One job's workers, store and plans; ``close()`` kills whatever is still running."""

    def __init__(self, spec: JobSpec, out: Path, etcd_url: str, *, job: str = "job1",
                 env: dict[str, str] | None = None) -> None:
        self.spec, self.out, self.etcd_url, self.job = spec, out, etcd_url, job
        out.mkdir(parents=True, exist_ok=True)
        self.run_dir = out / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.plan_file = out / "plan.json"
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        self.address = f"127.0.0.1:{self.store.port}"
        self.keys = Keys(PREFIX)
        self.plan = first_plan(spec, self.address, job=job)
        self.env = env or {}
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}
        self.lifelines: dict[tuple[str, int], int] = {}
        """(node, slot) -> read end of the worker's lifeline pipe (agent.lifeline)."""
        """(node, slot) -> the process running there (never restarted)."""
        self.dead: set[tuple[str, int]] = set()
        self.ranks: dict[tuple[str, int], int] = {}
        """(node, slot) -> its rank in the generation it was launched for (metrics file name)."""

    # ------------------------------------------------------------- plans
    def write_plan(self, plan: Plan) -> float:
        """Plan to etcd (the controller), then to the plan file (the agent's relay); the time written."""
        put(self.etcd_url, self.keys.job_plan(self.job), plan.to_json())
        write_atomic(self.plan_file, plan.to_json())
        self.plan = plan
        return time.time()

    def replan_without(self, lost_ranks: set[int], cause: str = "worker-failed",
                       free: dict[str, list[int]] | None = None) -> Plan:
        """Plan g+1 without ``lost_ranks``; ``free`` slots (e.g. where an idle survivor waits) may be used."""
        view = ClusterView(lost_ranks=frozenset(lost_ranks), free_slots=free or {},
                           store_addresses={"a": self.address, "b": self.address})
        plan, reason = replan(self.spec, self.plan, view, cause=cause, now=time.time())
        assert plan is not None, reason
        return plan

    def grow_into(self, free: dict[str, list[int]], at_step: int) -> Plan:
        view = ClusterView(free_slots=free, store_addresses={"a": self.address, "b": self.address})
        plan, reason = grow(self.spec, self.plan, view, at_step=at_step, now=time.time())
        assert plan is not None, reason
        return plan

    # ----------------------------------------------------------- workers
    def start(self, plan: Plan | None = None, faults: str = "") -> None:
        """Start a worker for every (node, slot) of ``plan`` that has none yet (all, at first)."""
        plan = plan or self.plan
        if plan.generation == 1:
            self.write_plan(plan)
        for w in plan.workers:
            if (w.node, w.slot) in self.procs:
                continue
            self._launch(plan, w, faults)

    def _launch(self, plan: Plan, w: WorkerAssignment, faults: str) -> None:
        launch_file = self.out / f"launch-g{plan.generation}-r{w.rank}.json"
        launch_file.write_text(json.dumps({"spec": self.spec.to_dict(), "plan": plan.to_dict()}))
        env = {
            **os.environ, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            launch.JOB_ID: plan.job_id, launch.RANK: str(w.rank), launch.LAUNCH_FILE: str(launch_file),
            launch.METRICS_FILE: str(self.metrics_path(w.node, w.slot)), launch.RUN_DIR: str(self.run_dir),
            launch.PLAN_FILE: str(self.plan_file), launch.NODE_ID: w.node,
            launch.FAULT: faults, launch.COLLECTIVE_TIMEOUT_S: "30", launch.PLAN_WAIT_S: "30",
            **self.env,
        }
        log = open(self.out / f"log-{w.node}{w.slot}.txt", "ab")
        lifeline, lifeline_w = open_lifeline()  # as an agent does: a death is seen when it begins
        try:
            self.procs[(w.node, w.slot)] = subprocess.Popen([sys.executable, "-m", "trainer.worker"], env=env,
                                                            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                                            pass_fds=(lifeline_w,))
        finally:
            os.close(lifeline_w)
        self.lifelines[(w.node, w.slot)] = lifeline
        self.ranks[(w.node, w.slot)] = w.rank

    def plan_rank(self, where: tuple[str, int]) -> int:
        """The rank the worker at (node, slot) has in the current plan."""
        return next(w.rank for w in self.plan.workers if (w.node, w.slot) == where)

    def metrics_path(self, node: str, slot: int) -> Path:
        return self.out / f"metrics-{node}{slot}.jsonl"

    def where(self, rank: int, plan: Plan | None = None) -> tuple[str, int]:
        w = (plan or self.plan).worker(rank)
        return w.node, w.slot

    def lines(self, node: str, slot: int) -> list[dict]:
        return read_lines(self.metrics_path(node, slot))

    def steps(self, node: str, slot: int) -> list[dict]:
        """Step lines only (not heartbeats, step_error events, recovery records or lines re-written
        from a disk checkpoint)."""
        return [r for r in self.lines(node, slot) if "step" in r and "loss" in r and "event" not in r
                and not r.get("replayed")]

    def recoveries(self, node: str, slot: int) -> list[dict]:
        return [r for r in self.lines(node, slot) if r.get("event") == "recovery"]

    def log(self, node: str, slot: int) -> str:
        path = self.out / f"log-{node}{slot}.txt"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"==== {n}{s}\n{self.log(n, s)}" for n, s in self.procs)

    def wait_for_death(self, timeout_s: float = 60.0) -> tuple[tuple[str, int], int, float]:
        """The next worker (not reported before) to exit non-zero: ((node, slot), code, unix time seen).

        Sleeps until a worker's lifeline closes or its pidfd becomes readable, as an agent
        does (agent.lifeline): no polling loop competes with the workers for the CPU, and a
        death is seen when the kernel begins it, before a long teardown (pinned memory, a
        CUDA context) ends."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for where, p in self.procs.items():
                code = p.poll()
                if code is None and self._lifeline_closed(where):
                    code = dying_returncode(p.pid)
                if code not in (None, 0) and where not in self.dead:
                    self.dead.add(where)
                    return where, code, time.time()
            self._sleep_until_an_exit(min(0.5, max(0.0, deadline - time.monotonic())))
        raise AssertionError(f"no worker died within {timeout_s}s\n{self.logs()}")

    def _lifeline_closed(self, where: tuple[str, int]) -> bool:
        fd = self.lifelines.get(where)
        if fd is None:
            return False
        try:
            closed = os.read(fd, 64) == b""
        except BlockingIOError:
            return False
        if closed:
            os.close(fd)
            del self.lifelines[where]
        return closed

    def kill_and_replan(self, timeout_s: float = 60.0) -> tuple[tuple[str, int], float]:
        """Play the controller after a planned kill -9: see the death, write plan g+1 from the
        survivors. ((node, slot) of the dead worker, unix time its death was seen)."""
        dead, code, seen = self.wait_for_death(timeout_s)
        assert code == -9, self.logs()
        self.write_plan(self.replan_without({self.plan_rank(dead)}))
        return dead, seen

    def _sleep_until_an_exit(self, timeout_s: float) -> None:
        import select

        running = [p.pid for p in self.procs.values() if p.returncode is None]
        fds: list[int] = []
        lifelines = list(self.lifelines.values())
        try:
            for pid in running:
                try:
                    fds.append(os.pidfd_open(pid))
                except ProcessLookupError:  # exited meanwhile: poll() sees it next
                    return
            if fds or lifelines:
                select.select(fds + lifelines, [], [], timeout_s)
            else:
                time.sleep(timeout_s)
        finally:
            for fd in fds:
                os.close(fd)

    def wait_step(self, node: str, slot: int, step: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in self.steps(node, slot)):
                return
            time.sleep(0.01)
        raise AssertionError(f"{node}{slot} did not reach step {step}\n{self.logs()}")

    def wait_all(self, timeout_s: float = 90.0) -> dict[tuple[str, int], int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for where, p in self.procs.items():
            try:
                codes[where] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{where} still running after {timeout_s}s\n{self.logs()}") from None
        return codes

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)
        for fd in self.lifelines.values():
            os.close(fd)
        self.lifelines.clear()


def reference_losses(spec: JobSpec, out: Path) -> dict[int, float]:
    """Losses of an uninterrupted single-process run of the same job (layouts are loss-invariant)."""
    import dataclasses

    from common.spec import Parallelism, Resources

    single = dataclasses.replace(spec, parallelism=Parallelism(dp=1, pp=1, zero_stage=0),
                                 resources=Resources(workers=1, device="cpu"))
    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    plan = first_plan(single, f"127.0.0.1:{store.port}", job="reference", nodes=("a",))
    launch_file = out / "launch.json"
    launch_file.write_text(json.dumps({"spec": single.to_dict(), "plan": plan.to_dict()}))
    metrics = out / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": "1", launch.RANK: "0",
           launch.LAUNCH_FILE: str(launch_file), launch.METRICS_FILE: str(metrics), launch.ELASTIC: "0"}
    subprocess.run([sys.executable, "-m", "trainer.worker"], env=env, check=True, timeout=120, cwd=str(REPO),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {r["step"]: r["loss"] for r in read_lines(metrics) if "loss" in r and "event" not in r}
