"""`tenax up`, `tenax down`: a whole cluster on this host (`tenax demo` builds on it: cli/demo.py).

``up`` starts an embedded etcd (unless ``--etcd``), ``--controllers`` controller
replicas (``tenax controller``, with any ``--controller-arg`` flags, e.g.
``--controller-arg=--hang-floor-s=4`` to detect hangs sooner) and ``--agents``
agents (node ids node-0, node-1, ...; with any ``--agent-arg``), each in its own
session (process group), waits until a controller answers gRPC health checks
and every node is registered, and records what it started in
``<state-dir>/cluster.json``. ``down`` stops all of it from that file: agents
first (so they report their workers and revoke their leases while etcd is
still there), then controllers, then etcd; SIGTERM, then SIGKILL after a grace
period. The state dir is ``--state-dir``, else ``$TENAX_HOME/local``, else
``~/.tenax/local``. Agents get ``--agent-arg`` values as extra flags (e.g. the
test hook ``--agent-arg=--fake-gpu-dir=DIR``).

Client commands find the controller through ``local_cluster_state()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import credentials
from cli.env import tenax_home
from common.embedded_etcd import start_etcd
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from controller import security
from protos.keys import DEFAULT_PREFIX, Keys

STATE_FILE = "cluster.json"
REPO = Path(__file__).resolve().parent.parent


def default_state_dir() -> Path:
    return tenax_home() / "local"


def checkpoint_dir(state_dir: Path) -> Path:
    """The local cluster's shared disk-checkpoint directory (every agent's ``--checkpoint-dir``:
    on one host it plays the shared filesystem a real cluster mounts on every node)."""
    return Path(state_dir) / "checkpoints"


def local_cluster_state(state_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The record ``tenax up`` wrote ({controller, controllers, etcd, pids, state_dir, ...}); None if none."""
    path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("controller") else None


@dataclass(kw_only=True)
class LocalClusterSettings:
    state_dir: Path
    """Where the state file, logs, etcd data and agent work dirs live."""
    agents: int = 2
    """Agents to start (node-0 .. node-N-1)."""
    slots: int | None = None
    """Worker slots per agent; None: each agent takes its count from NVML (one per GPU), or
    ``cpu_slots`` on a host without GPUs."""
    cpu_slots: int = 2
    """Slots of an agent on a host without GPUs (when ``slots`` is None)."""
    controllers: int = 1
    """Controller replicas (2+ for leader failover)."""
    etcd: str = ""
    """An existing etcd to use; empty: start an embedded one under the state dir."""
    lease_ttl_s: int = 5
    """Node lease and controller leader lease TTL (seconds)."""
    ready_timeout_s: float = 90.0
    """How long to wait for the controller and all nodes (seconds)."""
    agent_args: list[str] = field(default_factory=list)
    """Extra arguments for every agent (tests)."""
    controller_args: list[str] = field(default_factory=list)
    """Extra ``tenax controller`` flags for every controller replica (e.g. shorter detection timeouts)."""

    def validate(self) -> "LocalClusterSettings":
        if self.agents < 0 or self.agents > 64:
            raise ValueError(f"--agents must be between 0 and 64, got {self.agents}")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"--slots must be >= 1, got {self.slots}")
        if self.cpu_slots < 1:
            raise ValueError(f"--cpu-slots must be >= 1, got {self.cpu_slots}")
        if self.controllers < 1 or self.controllers > 5:
            raise ValueError(f"--controllers must be between 1 and 5, got {self.controllers}")
        if self.lease_ttl_s < 2:
            raise ValueError(f"--lease-ttl must be >= 2 seconds, got {self.lease_ttl_s}")
        if self.ready_timeout_s <= 0:
            raise ValueError(f"--timeout must be > 0, got {self.ready_timeout_s}")
        return self


def slot_args(settings: LocalClusterSettings) -> list[str]:
    """The agents' slot flags: ``--slots`` only when asked for; else NVML decides (agent/slots.py)."""
    if settings.slots is not None:
        return ["--slots", str(settings.slots)]
    return ["--cpu-slots", str(settings.cpu_slots)]


def agents_line(settings: LocalClusterSettings, agents: list[str]) -> str:
    if not agents:
        return "none (--agents 0)"
    slots = (f"{settings.slots} slots each" if settings.slots is not None
             else f"slots: one per GPU, {settings.cpu_slots} on a host without GPUs")
    return f"{', '.join(agents)} ({slots})"


class ClusterError(RuntimeError):
    pass


# ------------------------------------------------------------------ processes
def _spawn(cmd: list[str], log_path: Path, stdout_path: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    err = open(log_path, "ab")
    out = open(stdout_path, "wb") if stdout_path else err
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        err.close()
        if stdout_path:
            out.close()


def _process_key(pid: int) -> dict[str, Any]:
    """pid plus its start time, so `down` never signals a recycled pid."""
    try:
        return {"pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "started": 0.0}


def _same_process(entry: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(entry["pid"]))
        return abs(proc.create_time() - float(entry.get("started", 0))) < 1.0 and \
            proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


def stop_processes(entries: list[dict[str, Any]], grace_s: float = 10.0) -> None:
    """SIGTERM each process group, wait up to ``grace_s``, then SIGKILL what is left."""
    live = [e for e in entries if _same_process(e)]
    for e in live:
        _signal_group(int(e["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_same_process(e) for e in live):
        time.sleep(0.1)
    for e in live:
        _signal_group(int(e["pid"]), signal.SIGKILL)  # also leftovers in the group


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _read_controller_line(path: Path, proc: subprocess.Popen, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        try:
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    data = json.loads(line)
                    if data.get("controller"):
                        return data
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise ClusterError(f"controller exited with code {proc.returncode}")
        time.sleep(0.1)
    raise ClusterError("controller did not print its address in time")


def controller_channel(address: str, record: dict[str, Any] | None):
    """A blocking channel to a local controller: TLS + admin token when the cluster has them."""
    if record:
        return credentials.local_channel(address, record)
    return grpc.insecure_channel(address)


def _controller_serving(address: str, record: dict[str, Any] | None) -> bool:
    try:
        with controller_channel(address, record) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _controller_security(state_dir: Path, etcd_url: str) -> tuple[list[str], dict[str, Any]]:
    """(extra controller flags, security record): the controller serves TLS (it refuses to
    start without it). The record (dev CA, server certificate, admin token file) is kept in
    the state file for the client CLI."""
    from cli.controller import controller_tls_args  # here: client commands import this module, not the controller

    record = security.bootstrap_local(state_dir, etcd_url)
    return controller_tls_args(record), record


def registered_nodes(etcd_url: str, prefix: str = DEFAULT_PREFIX) -> set[str]:
    """Node ids with a NodeInfo in etcd (i.e. holding a live lease); none while etcd is unreachable.
    Raises ClusterError when etcd refuses the read (not worth waiting for)."""
    keys = Keys(prefix)

    async def read() -> set[str]:
        async with Etcd(etcd_url, timeout_s=3.0) as etcd:
            return {node for kv in await etcd.get_prefix(keys.nodes())
                    if (node := keys.parse_node_key(kv.key)) is not None}

    try:
        return asyncio.run(asyncio.wait_for(read(), 10))
    except (EtcdUnavailable, asyncio.TimeoutError, OSError):
        return set()
    except EtcdError as exc:
        raise ClusterError(f"etcd refused reading the registered nodes: {exc}") from exc


# ------------------------------------------------------------------ up / down
def start_cluster(settings: LocalClusterSettings, *, out=sys.stderr) -> dict[str, Any]:
    """Start everything; return the state record (also written to the state file)."""
    state_dir = settings.state_dir.resolve()
    existing = local_cluster_state(state_dir)
    if existing and any(_same_process(e) for e in existing.get("pids", {}).values()):
        raise ClusterError(f"a local cluster already runs from {state_dir} (run `tenax down` first)")
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for private in (state_dir, logs):  # etcd's data, the dev PKI, the admin token, every log
        private.chmod(0o700)
    pids: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {"state_dir": str(state_dir), "pids": pids, "logs": str(logs)}
    started: list[subprocess.Popen] = []
    try:
        if settings.etcd:
            etcd_url = settings.etcd
        else:
            server = start_etcd(state_dir / "etcd-data", log_path=logs / "etcd.log")
            etcd_url = server.url
            pids["etcd"] = _process_key(server.pid)
            state.update(etcd_data_dir=str(server.data_dir), etcd_client_port=server.client_port,
                         etcd_peer_port=server.peer_port)
        state["etcd"] = etcd_url
        print(f"etcd        {etcd_url}", file=out)

        security_args, record = _controller_security(state_dir, etcd_url)
        state["security"] = record
        controllers = []
        for i in range(settings.controllers):
            name = f"controller-{i}"
            proc = _spawn([sys.executable, "-m", "cli.main", "controller", "--etcd", etcd_url,
                           "--listen", "127.0.0.1:0", "--metrics-port", "0", "--id", name,
                           "--lease-ttl", str(settings.lease_ttl_s), *security_args, *settings.controller_args],
                          logs / f"{name}.log", stdout_path=logs / f"{name}.out")
            started.append(proc)
            pids[name] = _process_key(proc.pid)
            controllers.append((name, proc))

        agents = [f"node-{i}" for i in range(settings.agents)]
        for node in agents:
            proc = _spawn([sys.executable, "-m", "cli.main", "agent", "--etcd", etcd_url, "--node-id", node,
                           *slot_args(settings), "--lease-ttl", str(settings.lease_ttl_s),
                           "--work-dir", str(state_dir / "agents" / node),
                           "--checkpoint-dir", str(checkpoint_dir(state_dir)), *settings.agent_args],
                          logs / f"{node}.log")
            started.append(proc)
            pids[node] = _process_key(proc.pid)

        deadline = time.monotonic() + settings.ready_timeout_s
        addresses = []
        metrics = []
        for name, proc in controllers:
            line = _read_controller_line(logs / f"{name}.out", proc, deadline)
            addresses.append(line["controller"])
            metrics.append(line.get("metrics", ""))
        state.update(controller=addresses[0], controllers=addresses, controller_metrics=metrics, nodes=agents)
        _write_state(state_dir, state)  # early, so `tenax down` can clean up even if we fail below
        while not all(_controller_serving(a, record) for a in addresses):
            _check_alive(started, logs)
            if time.monotonic() > deadline:
                raise ClusterError("controller does not answer health checks")
            time.sleep(0.2)
        print(f"controller  {', '.join(addresses)}", file=out)
        while True:
            missing = set(agents) - registered_nodes(etcd_url)
            if not missing:
                break
            _check_alive(started, logs)
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes not registered after {settings.ready_timeout_s:.0f} s: "
                                   f"{', '.join(sorted(missing))}")
            time.sleep(0.2)
        print(f"agents      {agents_line(settings, agents)}", file=out)
        _write_state(state_dir, state)
        return state
    except BaseException:
        stop_processes(list(reversed(list(pids.values()))), grace_s=5.0)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise


def _check_alive(procs: list[subprocess.Popen], logs: Path) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise ClusterError(f"a process exited early ({' '.join(proc.args[2:5])}, code {proc.returncode}); "
                               f"see the logs in {logs}")


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(state_dir / STATE_FILE)


def stop_cluster(state: dict[str, Any], grace_s: float = 10.0) -> None:
    """Agents first (they report their workers and revoke their leases), then controllers, then etcd."""
    pids = state.get("pids", {})
    for kind in ("node-", "controller-", "etcd"):
        stop_processes([entry for name, entry in pids.items() if name.startswith(kind)], grace_s=grace_s)
    Path(state["state_dir"], STATE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------ CLI
def register(sub) -> None:
    up = sub.add_parser("up", help="start a local cluster (etcd, controller, agents) on this host")
    up.add_argument("--agents", type=int, default=2, help="agents to start (default 2)")
    up.add_argument("--slots", type=int, default=None,
                    help="worker slots per agent (default: each agent takes one per GPU NVML finds; "
                         "--cpu-slots on a host without GPUs; --agent-arg=--gpus-per-slot=N or "
                         "--agent-arg=--slot-devices=MAP for other maps)")
    up.add_argument("--cpu-slots", type=int, default=2, help="slots per agent on a host without GPUs (default 2)")
    up.add_argument("--controllers", type=int, default=1, help="controller replicas (default 1)")
    up.add_argument("--etcd", default="", help="use this etcd instead of starting one")
    up.add_argument("--lease-ttl", type=int, default=5, help="node and leader lease TTL, seconds (default 5)")
    up.add_argument("--detach", action="store_true", help="print one JSON object and return")
    up.add_argument("--state-dir", type=Path, default=None, help="default: $TENAX_HOME/local or ~/.tenax/local")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait until ready")
    up.add_argument("--agent-arg", action="append", default=[],
                    help="extra flag for every agent, repeatable; use the = form for values starting with "
                         "'-' (e.g. --agent-arg=--kill-grace=2, or the test hook --agent-arg=--fake-gpu-dir=DIR)")
    up.add_argument("--controller-arg", action="append", default=[], metavar="FLAG",
                    help="extra `tenax controller` flag for every controller replica, repeatable; write it "
                         "with '=' (e.g. --controller-arg=--hang-floor-s=4 --controller-arg=--straggler-window=12; "
                         "see `tenax controller --help`)")
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the local cluster started by `tenax up`")
    down.add_argument("--state-dir", type=Path, default=None)
    down.set_defaults(func=_down)



def _settings(args: argparse.Namespace) -> LocalClusterSettings:
    return LocalClusterSettings(state_dir=args.state_dir or default_state_dir(), agents=args.agents,
                                slots=args.slots, cpu_slots=args.cpu_slots, controllers=args.controllers,
                                etcd=args.etcd,
                                lease_ttl_s=args.lease_ttl, ready_timeout_s=args.timeout,
                                agent_args=args.agent_arg, controller_args=args.controller_arg).validate()


def _up(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        state = start_cluster(settings, out=sys.stderr)
    except (ValueError, ClusterError, RuntimeError) as exc:
        print(f"tenax up: {exc}", file=sys.stderr)
        return 1
    public = {"controller": state["controller"], "controllers": state["controllers"], "etcd": state["etcd"],
              "pids": {name: e["pid"] for name, e in state["pids"].items()}, "state_dir": state["state_dir"]}
    if args.detach:
        print(json.dumps(public), flush=True)
        return 0
    print(f"local cluster up (state in {state['state_dir']}); Ctrl-C stops it", file=sys.stderr)
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a background `up` inherits SIGINT ignored
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    while not stop:
        time.sleep(0.2)
    print("stopping the local cluster", file=sys.stderr)
    stop_cluster(state)
    return 0


def _down(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    state = local_cluster_state(state_dir)
    if state is None:
        print(f"tenax down: no local cluster recorded in {state_dir}", file=sys.stderr)
        return 1
    stop_cluster(state)
    print("local cluster stopped", file=sys.stderr)
    return 0


def _tenax(*argv: str, record: dict[str, Any] | None, capture: bool = False,
           timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if record:
        env.update(credentials.client_env(record))
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, timeout=timeout_s,
                          capture_output=capture, text=True, env=env)
