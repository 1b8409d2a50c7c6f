"""Soak: one job on a local cluster through a seeded random mix of faults.

    PYTHONPATH=. python bench/soak.py --faults 15 --seed 1 [--interval 4] [--json out.json]

Starts its own cluster as `tenax up` does (embedded etcd, ``--controllers``
controller replicas, ``--agents`` agents of ``--slots`` slots, short lease
TTL, fast hang detection), submits a small dp2 x pp2 GPT job (CPU, gloo) and,
every ``--interval`` seconds, injects one fault drawn (seeded) from:

    worker-kill      kill -9 of a worker process
    worker-hang      SIGSTOP of a worker process (the cluster must find and replace it)
    node-lost        kill -9 of an agent (its workers die with it), restarted under
                     the same node id after 4-10 s
    controller-kill  kill -9 of a controller replica, restarted on the same address after 1-3 s
    etcd-kill        kill -9 of etcd, restarted on its data after 1-3 s

Victims are found from the process tree (not the control plane, which may be
down). Then it waits for the job to end and prints a report (JSON on the last
line of stdout, a table on stderr): faults injected per kind, recoveries, the
MTTR per fault kind (p50/max: from the fault until the job trains again, i.e. the
start of the first step past the newest one it had made before the fault; 0: training
never stopped), steps lost, the final size, whether the job
succeeded, and whether every step's loss equals an uninterrupted single-process
run of the same spec (rtol 1e-4). Everything it started is killed at the end
(process groups). Every wait is bounded; the bounds come from measured step times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from cli import credentials  # noqa: E402
from cli.local import LocalClusterSettings, _spawn, controller_channel, start_cluster, stop_processes  # noqa: E402
from common.embedded_etcd import start_etcd  # noqa: E402

from protos import tenax_pb2 as pb  # noqa: E402
from protos import tenax_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("worker-kill", "worker-hang", "node-lost", "controller-kill", "etcd-kill")
RESTART_DELAY_S = {"node-lost": (4.0, 10.0), "controller-kill": (1.0, 3.0), "etcd-kill": (1.0, 3.0)}
"""(min, max) seconds before a killed agent / controller / etcd is started again."""
RTOL = 1e-4
DONE = ("SUCCEEDED", "FAILED", "CANCELLED")

FAST_DETECTION_ARGS = ("--hang-floor-s=4", "--hang-k=5", "--health-interval-s=0.3")
"""Controller flags for hang detection within a soak's time (the 10 s default floor is for real clusters)."""
SOAK_QUARANTINE_ARGS = ("--quarantine-base-s=3", "--quarantine-max-s=12", "--quarantine-window-s=60",
                        "--slot-cordon-failures=1000", "--node-cordon-failures=1000")
"""The soak's faults are injected, not the slots' fault: short cool-downs (so the job can grow
back to its full size between faults) and no cordons (six slots take dozens of faults)."""


@dataclass(kw_only=True)
class SoakSettings:
    faults: int = 15
    """Faults to inject."""
    seed: int = 0
    """Seed of the fault mix, the victims and the restart delays."""
    interval_s: float = 4.0
    """Seconds between two faults."""
    kinds: tuple[str, ...] = KINDS
    """Fault kinds to draw from."""
    agents: int = 3
    slots: int = 2
    controllers: int = 2
    lease_ttl_s: int = 3
    """Node and leader lease TTL (seconds)."""
    steps: int = 0
    """Job steps; 0: enough to outlast the faults (from the measured step time)."""
    warmup_steps: int = 5
    """Steps the job makes before the first fault."""
    state_dir: Path | None = None
    """Cluster state dir (logs stay there); default: a temp dir."""
    survivors_first: bool = True
    """The controllers' ``--[no-]survivors-first`` (a failure's plan on the survivors alone, the
    free slots added by a growth); off measures the plan that waits for new workers."""
    end_timeout_s: float = 0.0
    """Bound on waiting for the job to end after the last fault while it makes no progress
    (seconds); 0: derived from the step time. A job that keeps stepping is waited for (a
    loaded host slows every step, not only the measured first ones)."""

    def validate(self) -> "SoakSettings":
        if self.faults < 0:
            raise ValueError(f"--faults must be >= 0, got {self.faults}")
        if self.interval_s <= 0:
            raise ValueError(f"--interval must be > 0, got {self.interval_s}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"--kinds: unknown {sorted(unknown)} (choose from {', '.join(KINDS)})")
        if self.agents * self.slots < 4:
            raise ValueError("the dp2 x pp2 job needs at least 4 slots (--agents x --slots)")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        return self


def soak_spec(steps: int) -> dict[str, Any]:
    """The job: a GPT small enough for many steps a second on a loaded CPU."""
    return {
        "name": "soak", "seed": 7, "steps": steps, "global_batch_size": 8, "micro_batch_size": 2,
        "model": {"arch": "gpt", "layers": 4, "d_model": 32, "heads": 2, "vocab_size": 64, "seq_len": 16,
                  "dropout": 0.1},
        "data": {"kind": "synthetic", "num_samples": 256},
        "optimizer": {"name": "adamw", "lr": 0.003, "warmup_steps": 2},
        "parallelism": {"dp": 2, "pp": 2, "zero_stage": 1},
        "elastic": {"min_workers": 1, "max_workers": 4, "snapshot_every": "1"},
        "resources": {"workers": 4, "device": "cpu"},
    }


# ------------------------------------------------------------------ pure report math
def fault_schedule(seed: int, count: int, kinds: tuple[str, ...]) -> list[tuple[str, float]]:
    """(kind, restart delay s) of each fault, drawn from ``seed``: the same seed, the same mix."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.choice(kinds)
        low, high = RESTART_DELAY_S.get(kind, (0.0, 0.0))
        out.append((kind, round(rng.uniform(low, high), 2)))
    return out


def steps_redone(records: list[dict]) -> int:
    """Committed steps trained again, from the workers' own step lines: a step that plan
    generations g1 < g2 both trained was redone once in g2 (lost with g1's state). Counts what
    the recovery records cannot: a recovery superseded before it completed records nothing."""
    generations: dict[int, set[int]] = {}
    for r in records:
        generations.setdefault(int(r["step"]), set()).add(int(r.get("generation", 0)))
    return sum(len(g) - 1 for g in generations.values())


def progress_times(records: list[dict]) -> list[tuple[float, int, float]]:
    """(unix time, step, start) at which the job first went past every step before it: the
    times it made new progress (a step re-run after a recovery is not new). ``start``: when
    the earliest rank began that step in that generation (its line's time less its
    ``step_time``; the line's time where a line has none)."""
    began: dict[tuple[Any, int], float] = {}
    for r in records:
        key = (r.get("generation"), int(r["step"]))
        start = float(r["time"]) - float(r.get("step_time") or 0.0)
        began[key] = min(start, began.get(key, start))
    out: list[tuple[float, int, float]] = []
    best = 0
    for r in sorted(records, key=lambda r: r["time"]):
        if int(r["step"]) > best:
            best = int(r["step"])
            out.append((float(r["time"]), best, began[(r.get("generation"), best)]))
    return out


def time_to_progress(fault_time: float, progress: list[tuple[float, int, float]], end: float) -> float:
    """MTTR of one fault: from the fault until the job trains again, i.e. until the start of
    the first step that goes past the newest step it had made before the fault (the step in
    flight at the fault is redone, and its time on the new layout is training, not repair);
    0 if that step began before the fault (training never stopped). With no progress after
    the fault: until ``end``."""
    before = max((step for t, step, _ in progress if t <= fault_time), default=0)
    resumed = next((start for t, step, start in progress if t > fault_time and step > before), end)
    return max(0.0, resumed - fault_time)


HEARTBEAT_SLACK_S = 3.0
"""A lost node's failure time is its ranks' last progress heartbeat: up to this long before the fault."""


def fault_recoveries(faults: list[dict[str, Any]], recoveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault (oldest first), the phases the recovery records give: the first failure
    recovery (not a growth, drain or rebalance) whose failure time lies in the fault's window
    (from the fault until the next one, both less ``HEARTBEAT_SLACK_S``), and the growth that
    followed it in the window. Pure.

    ``until_failure_s``: fault -> the failure the controller recovered from (a worker's exit
    record; for a hang: detection, the Flight Recorder dumps and the kill; for a lost node: the
    last heartbeat of its ranks, so it can be negative); ``recovery_s``: that failure -> every
    rank's first step on the new plan; ``full_size_s``: fault -> the first step after the growth
    back (absent: no growth in the window). A fault with no failure recovery (a controller or
    etcd kill, a lost node that ran no worker) gets none of these."""
    out = []
    ordered = sorted(faults, key=lambda f: f["time"])
    planned = ("grow", "drain", "rebalance", "migrate")
    for i, fault in enumerate(ordered):
        start = fault["time"]
        end = ordered[i + 1]["time"] - HEARTBEAT_SLACK_S if i + 1 < len(ordered) else math.inf
        row: dict[str, Any] = {"index": fault.get("index", i), "kind": fault["kind"]}
        failed = [r for r in recoveries if not str(r.get("cause", "")).startswith(planned)
                  and start - HEARTBEAT_SLACK_S <= float(r["time"]) < end]
        if failed:
            first = min(failed, key=lambda r: float(r["time"]))
            row.update(cause=str(first["cause"])[:80], until_failure_s=round(float(first["time"]) - start, 3),
                       recovery_s=round(float(first["total_s"]), 3), rebuild_s=round(float(first["rebuild_s"]), 3),
                       transfer_s=round(float(first["transfer_s"]), 3), layout=first.get("layout", ""))
            grown = [r for r in recoveries if str(r.get("cause", "")).startswith("grow")
                     and float(first["time"]) <= float(r["time"]) < end]
            if grown:
                g = min(grown, key=lambda r: float(r["time"]))
                row["full_size_s"] = round(float(g["time"]) + float(g["total_s"]) - start, 3)
        out.append(row)
    return out


def loss_check(observed: dict[int, list[float]], reference: dict[int, float], steps: int,
               rtol: float = RTOL) -> dict[str, Any]:
    """Every step 1..steps has a loss, and every loss recorded for it (any rank, any generation)
    equals the uninterrupted run's within ``rtol``."""
    missing = [s for s in range(1, steps + 1) if s not in observed]
    bad = []
    for s, values in sorted(observed.items()):
        ref = reference.get(s)
        for v in values:
            if ref is None or not math.isclose(v, ref, rel_tol=rtol, abs_tol=0.0):
                bad.append({"step": s, "loss": v, "reference": ref})
                break
    return {"equal": not missing and not bad, "missing_steps": missing[:20], "n_missing": len(missing),
            "mismatches": bad[:20], "n_mismatched": len(bad)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


# ------------------------------------------------------------------ the cluster
@dataclass
class Proc:
    """One restartable process of the cluster: its command line and current pid."""

    name: str
    argv: list[str]
    pid: int
    popen: subprocess.Popen | None = None
    restarts: int = 0


@dataclass
class Soak:
    settings: SoakSettings
    state_dir: Path
    state: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    started_pids: set[int] = field(default_factory=set)
    pending: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, process name) restarts due."""
    etcd_popen: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    # ----------------------------------------------------------- start / stop
    def start(self) -> None:
        s = self.settings
        cluster = LocalClusterSettings(
            state_dir=self.state_dir, agents=s.agents, slots=s.slots, controllers=s.controllers,
            lease_ttl_s=s.lease_ttl_s, ready_timeout_s=120,
            agent_args=["--kill-grace=2"],
            controller_args=[*FAST_DETECTION_ARGS, *SOAK_QUARANTINE_ARGS,
                             "--survivors-first" if s.survivors_first else "--no-survivors-first"]).validate()
        with open(os.devnull, "w") as quiet:
            self.state = start_cluster(cluster, out=quiet)
        for name, entry in self.state["pids"].items():
            pid = int(entry["pid"])
            self.started_pids.add(pid)
            if name == "etcd":
                self.procs[name] = Proc(name, [], pid)
                continue
            argv = psutil.Process(pid).cmdline()
            if name.startswith("controller-"):  # restart on the same address
                index = int(name.split("-")[1])
                argv[argv.index("--listen") + 1] = self.state["controllers"][index]
            self.procs[name] = Proc(name, argv, pid)

    def all_pids(self) -> set[int]:
        pids = set(self.started_pids) | {p.pid for p in self.procs.values()}
        for pid in list(pids):
            with contextlib.suppress(psutil.Error):
                pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        return pids

    def stop(self) -> None:
        pids = self.all_pids()
        for pid in pids:  # a SIGSTOPped worker must be able to die on SIGTERM
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
        order = [n for n in self.procs if n.startswith("node-")] + \
                [n for n in self.procs if n.startswith("controller-")] + ["etcd"]
        for name in order:
            p = self.procs.get(name)
            if p:
                stop_processes([{"pid": p.pid, "started": _started(p.pid)}], grace_s=5.0)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _reap()

    # ----------------------------------------------------------- control plane reads
    def record(self) -> dict[str, Any]:
        return self.state.get("security") or {}

    def call(self, method: str, request, service=pb_grpc.JobServiceStub, timeout_s: float = 5.0):
        last: Exception | None = None
        for address in self.state["controllers"]:
            try:
                with controller_channel(address, self.state.get("security")) as channel:
                    return getattr(service(channel), method)(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                last = exc
        raise ConnectionError(f"no controller answered {method}: {last!r:.300}")

    def job(self, job_id: str) -> pb.Job | None:
        try:
            return self.call("GetJob", pb.GetJobRequest(job_id=job_id))
        except ConnectionError:
            return None

    def submit(self, spec: dict[str, Any]) -> str:
        path = self.state_dir / "job.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, **credentials.client_env(self.record())}
        env.pop("TENAX_CONTROLLER", None)
        out = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(path), "--controller",
                              self.state["controller"]], cwd=REPO, env=env, text=True, capture_output=True,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"submit failed: {out.stdout}\n{out.stderr}")
        return out.stdout.split()[1]

    # ----------------------------------------------------------- faults
    def workers(self) -> list[psutil.Process]:
        """Worker processes, found under the agents (works while the control plane is down)."""
        out = []
        for name, p in self.procs.items():
            if not name.startswith("node-"):
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(p.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "trainer.worker" in " ".join(child.cmdline()) and \
                                child.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                            out.append(child)
        return out

    def inject(self, kind: str, restart_after_s: float, rng: random.Random) -> dict[str, Any] | None:
        """Inject one fault; None if it had no victim (e.g. no worker running right now)."""
        now = time.monotonic()
        if kind in ("worker-kill", "worker-hang"):
            candidates = self.workers()
            if not candidates:
                return None
            victim = rng.choice(sorted(candidates, key=lambda c: c.pid))
            os.kill(victim.pid, signal.SIGKILL if kind == "worker-kill" else signal.SIGSTOP)
            return {"kind": kind, "victim": f"worker pid {victim.pid}", "time": time.time()}
        if kind == "node-lost":
            names = [n for n in self.procs if n.startswith("node-") and not self._down(n)]
        elif kind == "controller-kill":
            names = [n for n in self.procs if n.startswith("controller-") and not self._down(n)]
        else:
            names = [] if self._down("etcd") else ["etcd"]
        if not names:
            return None
        name = rng.choice(sorted(names))
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.pending.append((now + restart_after_s, name))
        return {"kind": kind, "victim": name, "time": time.time(), "restart_after_s": restart_after_s}

    def _down(self, name: str) -> bool:
        return any(n == name for _, n in self.pending)

    def restart_due(self, *, all_now: bool = False) -> None:
        now = time.monotonic()
        due = [(t, n) for t, n in self.pending if all_now or t <= now]
        for item in due:
            self.pending.remove(item)
            self._restart(item[1])

    def _restart(self, name: str) -> None:
        p = self.procs[name]
        _reap()
        p.restarts += 1
        logs = Path(self.state["logs"])
        if name == "etcd":
            server = start_etcd(self.state["etcd_data_dir"], client_port=self.state["etcd_client_port"],
                                peer_port=self.state["etcd_peer_port"],
                                log_path=logs / f"etcd-{p.restarts}.log", timeout_s=30)
            p.pid, p.popen = server.pid, server.process
        else:
            stdout = logs / f"{name}-{p.restarts}.out" if name.startswith("controller-") else None
            popen = _spawn(p.argv, logs / f"{name}.log", stdout_path=stdout)
            p.pid, p.popen = popen.pid, popen
        self.started_pids.add(p.pid)


def _started(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _reap() -> None:
    """Collect our killed children (etcd, restarted processes), so none lingers as a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ------------------------------------------------------------------ metrics files
def metric_lines(state_dir: Path, job_id: str) -> list[dict]:
    """Every line of every worker's metrics file (all agents, all generations)."""
    out = []
    for path in sorted(state_dir.glob(f"agents/*/jobs/{job_id}/*.metrics.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
    return out


def step_records(lines: list[dict]) -> list[dict]:
    """Steps trained (not a line re-written from a disk checkpoint: ``replayed``)."""
    return [r for r in lines if "step" in r and "loss" in r and "event" not in r and "time" in r
            and not r.get("replayed")]


def reference_losses(spec: dict[str, Any], out: Path, timeout_s: float) -> dict[int, float]:
    """Losses of an uninterrupted run of the same spec on one process (layouts are loss-invariant)."""
    single = {**spec, "parallelism": {"dp": 1, "pp": 1, "zero_stage": 0},
              "resources": {"workers": 1, "device": "cpu"}}
    out.mkdir(parents=True, exist_ok=True)
    config = out / "reference.yaml"
    config.write_text(yaml.safe_dump(single))
    metrics = out / "reference-metrics.jsonl"
    subprocess.run([sys.executable, "-m", "cli.main", "train-local", "--nproc", "1", "--config", str(config),
                    "--metrics", str(metrics), "--timeout", str(timeout_s)], cwd=REPO, check=True,
                   timeout=timeout_s + 30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {int(r["step"]): float(r["loss"]) for r in step_records(metric_lines_of(metrics))}


def metric_lines_of(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


# ------------------------------------------------------------------ the run
def measure_step_s(soak: Soak, job_id: str, warmup: int, timeout_s: float) -> float:
    """Median seconds per step over the first steps after ``warmup`` (waits for them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = step_records(metric_lines(soak.state_dir, job_id))
        first = {}
        for r in records:
            first.setdefault(int(r["step"]), float(r["time"]))
        done = sorted(s for s in first if s > 1)
        if len(done) >= warmup:
            times = [first[s] for s in sorted(first)]
            gaps = [b - a for a, b in zip(times[1:], times[2:])]
            return statistics.median(gaps) if gaps else 0.1
        time.sleep(0.5)
    raise TimeoutError(f"the job made no {warmup} steps in {timeout_s:.0f} s")


def run(settings: SoakSettings, out=sys.stderr) -> dict[str, Any]:
    settings.validate()
    state_dir = settings.state_dir or Path(tempfile.mkdtemp(prefix="tenax-soak-"))
    soak = Soak(settings, state_dir)
    rng = random.Random(settings.seed)
    schedule = fault_schedule(settings.seed, settings.faults, settings.kinds)
    t_start = time.monotonic()
    try:
        soak.start()
        print(f"soak: cluster up in {time.monotonic() - t_start:.1f} s (state {state_dir})", file=out)
        # A probe job measures the step time; the real job's length follows from it.
        steps = settings.steps or 100_000
        job_id = soak.submit(soak_spec(steps))
        step_s = measure_step_s(soak, job_id, settings.warmup_steps, timeout_s=180)
        if not settings.steps:
            # the faults take faults x interval; recoveries and restarts stand still for some of it,
            # and after the last one the job needs time to grow back to its full size (a restarted
            # agent re-registers, the growth's new workers start: ~20 s on a loaded 2-core host)
            busy_s = settings.faults * settings.interval_s * 1.5 + 45
            steps = max(100, int(busy_s / step_s))
            soak.call("CancelJob", pb.CancelJobRequest(job_id=job_id))
            _wait_phase(soak, job_id, DONE, 60)
            job_id = soak.submit(soak_spec(steps))
            measure_step_s(soak, job_id, settings.warmup_steps, timeout_s=180)
        print(f"soak: job {job_id}, {steps} steps, {step_s * 1000:.0f} ms/step, {settings.faults} faults "
              f"every {settings.interval_s} s, seed {settings.seed}", file=out)

        injected: list[dict[str, Any]] = []
        skipped = 0
        next_at = time.monotonic()
        for kind, restart_after in schedule:
            while time.monotonic() < next_at:
                soak.restart_due()
                time.sleep(0.05)
            job = soak.job(job_id)
            if job is not None and pb.JobPhase.Name(job.status.phase) in DONE:
                print(f"soak: job ended ({pb.JobPhase.Name(job.status.phase)}) before all faults", file=out)
                break
            fault = soak.inject(kind, restart_after, rng)
            if fault is None:
                skipped += 1
                next_at = time.monotonic() + 0.5
                # a fault with no victim now: try the same kind again shortly
                fault = _retry_inject(soak, kind, restart_after, rng, tries=20)
            if fault is not None:
                fault["index"] = len(injected)
                injected.append(fault)
                print(f"soak: fault {len(injected)}/{settings.faults}: {fault['kind']} ({fault['victim']})",
                      file=out)
            next_at = time.monotonic() + settings.interval_s
        while soak.pending:
            soak.restart_due()
            time.sleep(0.05)

        remaining = steps
        job = soak.job(job_id)
        if job is not None:
            remaining = max(0, steps - job.status.step)
        end_timeout = settings.end_timeout_s or (remaining * step_s * 4 + 60 + 10 * settings.lease_ttl_s)
        job = _wait_phase(soak, job_id, DONE, end_timeout, while_progressing=True)
        phase = pb.JobPhase.Name(job.status.phase) if job is not None else "UNKNOWN"
        time.sleep(1.0)  # the last metric lines
        report = build_report(soak, job_id, job, phase, steps, step_s, injected, settings)
        report["duration_s"] = round(time.monotonic() - t_start, 1)
        report["state_dir"] = str(state_dir)
    finally:
        soak.stop()
    # after the cluster is gone (its cores go to the reference run); the metrics files stay
    reference = reference_losses(soak_spec(steps), state_dir / "reference", timeout_s=max(120, steps * step_s * 4))
    observed: dict[int, list[float]] = {}
    for r in step_records(metric_lines(state_dir, job_id)):
        observed.setdefault(int(r["step"]), []).append(float(r["loss"]))
    report["losses"] = loss_check(observed, reference, steps)
    return report


def _retry_inject(soak: Soak, kind: str, restart_after: float, rng: random.Random, tries: int):
    for _ in range(tries):
        soak.restart_due()
        time.sleep(0.5)
        fault = soak.inject(kind, restart_after, rng)
        if fault is not None:
            return fault
    return None


def _wait_phase(soak: Soak, job_id: str, phases: tuple[str, ...], timeout_s: float, *,
                while_progressing: bool = False) -> pb.Job | None:
    """The job once in one of ``phases``; gives up after ``timeout_s`` (with ``while_progressing``:
    after ``timeout_s`` without a new step)."""
    deadline = time.monotonic() + timeout_s
    job = None
    best = -1
    while time.monotonic() < deadline:
        got = soak.job(job_id)
        if got is not None:
            job = got
            if pb.JobPhase.Name(job.status.phase) in phases:
                return job
            if while_progressing and job.status.step > best:
                best = job.status.step
                deadline = time.monotonic() + timeout_s
        time.sleep(1.0)
    return job


def build_report(soak: Soak, job_id: str, job: pb.Job | None, phase: str, steps: int, step_s: float,
                 injected: list[dict[str, Any]], settings: SoakSettings) -> dict[str, Any]:
    records = step_records(metric_lines(soak.state_dir, job_id))
    progress = progress_times(records)
    end = progress[-1][0] if progress else time.time()
    stalls: dict[str, list[float]] = {}
    for fault in injected:
        fault["mttr_s"] = round(time_to_progress(fault["time"], progress, end), 3)
        stalls.setdefault(fault["kind"], []).append(fault["mttr_s"])
    recoveries = list(job.status.recoveries) if job is not None else []
    phases = fault_recoveries(injected, [
        {"cause": r.cause, "time": r.time, "total_s": r.total_s, "rebuild_s": r.rebuild_s,
         "transfer_s": r.transfer_s, "layout": f"dp{r.new_layout.dp}pp{r.new_layout.pp}"} for r in recoveries])
    by_cause: dict[str, int] = {}
    totals: dict[str, list[float]] = {}
    for r in recoveries:
        by_cause[r.cause] = by_cause.get(r.cause, 0) + 1
        totals.setdefault(r.cause, []).append(r.total_s)
    final_workers = len(job.status.workers) if job is not None else 0
    if job is not None and job.status.layout.dp:
        final_workers = job.status.layout.dp * job.status.layout.pp
    return {
        "job_id": job_id, "seed": settings.seed, "phase": phase, "succeeded": phase == "SUCCEEDED",
        "message": job.status.message if job is not None else "",
        "steps": steps, "final_step": job.status.step if job is not None else 0,
        "step_s": round(step_s, 4),
        "faults_injected": len(injected),
        "faults_by_kind": {k: len(v) for k, v in sorted(stalls.items())},
        "recoveries": len(recoveries), "recoveries_by_cause": by_cause,
        "recovery_total_s_by_cause": {c: {"p50": _r(percentile(v, 0.5)), "max": _r(max(v)), "n": len(v)}
                                      for c, v in sorted(totals.items())},
        "mttr_s_by_kind": {k: {"p50": _r(percentile(v, 0.5)), "max": _r(max(v)), "n": len(v)}
                            for k, v in sorted(stalls.items())},
        "steps_lost": sum(r.steps_lost for r in recoveries),
        "steps_redone": steps_redone(records),
        "final_size": final_workers, "full_size": 4,
        "phases_s_by_kind": phase_summary(phases),
        "faults": injected, "fault_phases": phases,
    }


def phase_summary(phases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """p50 per fault kind of each phase of ``fault_recoveries`` (faults that have it)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({p["kind"] for p in phases}):
        rows = [p for p in phases if p["kind"] == kind]
        out[kind] = {name: _r(percentile([p[name] for p in rows if name in p], 0.5))
                     for name in ("until_failure_s", "recovery_s", "full_size_s")}
        out[kind]["n"] = sum(1 for p in rows if "recovery_s" in p)
    return out


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def print_table(report: dict[str, Any], out=sys.stderr) -> None:
    print(f"\nsoak seed {report['seed']}: job {report['job_id']} {report['phase']} at step "
          f"{report['final_step']}/{report['steps']} ({report['message']})", file=out)
    print(f"  faults injected {report['faults_injected']}, recoveries {report['recoveries']} "
          f"{report['recoveries_by_cause']}, steps lost {report['steps_lost']} "
          f"(redone, from the step lines: {report.get('steps_redone')}), final size "
          f"{report['final_size']}/{report['full_size']}, {report.get('duration_s', '?')} s", file=out)
    print(f"  {'fault kind':<16} {'n':>3} {'MTTR p50 s':>12} {'MTTR max s':>12}", file=out)
    for kind, row in report["mttr_s_by_kind"].items():
        print(f"  {kind:<16} {row['n']:>3} {row['p50']:>12} {row['max']:>12}", file=out)
    print(f"  {'phases p50 s':<16} {'n':>3} {'to failure':>12} {'recovery':>12} {'full size':>12}", file=out)
    for kind, row in report.get("phases_s_by_kind", {}).items():
        print(f"  {kind:<16} {row['n']:>3} {str(row['until_failure_s']):>12} {str(row['recovery_s']):>12} "
              f"{str(row['full_size_s']):>12}", file=out)
    for cause, row in report["recovery_total_s_by_cause"].items():
        print(f"  recovery {cause:<40.40} n={row['n']:<3} total p50 {row['p50']} s, max {row['max']} s", file=out)
    losses = report.get("losses", {})
    print(f"  losses equal to the uninterrupted run (rtol {RTOL}): {losses.get('equal')} "
          f"(missing {losses.get('n_missing')}, mismatched {losses.get('n_mismatched')})", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=4.0, help="seconds between faults (default 4)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--steps", type=int, default=0, help="job steps (default: enough to outlast the faults)")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--controllers", type=int, default=2)
    p.add_argument("--lease-ttl", type=int, default=3)
    p.add_argument("--state-dir", type=Path, default=None, help="keep the cluster's logs here")
    p.add_argument("--survivors-first", action=argparse.BooleanOptionalAction, default=True,
                   help="the controllers' --[no-]survivors-first (default on)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    try:
        settings = SoakSettings(faults=args.faults, seed=args.seed, interval_s=args.interval,
                                kinds=tuple(k for k in args.kinds.split(",") if k), steps=args.steps,
                                agents=args.agents, slots=args.slots, controllers=args.controllers,
                                lease_ttl_s=args.lease_ttl, state_dir=args.state_dir,
                                survivors_first=args.survivors_first).validate()
    except ValueError as exc:
        p.error(str(exc))
    def stop(signum, _frame):  # a SIGTERM (e.g. `timeout`) still stops everything started
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not break the cleanup
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    report = run(settings)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    ok = report["succeeded"] and report["losses"]["equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
