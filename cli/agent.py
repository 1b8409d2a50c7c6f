"""``tenax agent``: flags -> ``AgentSettings`` -> the agent service (agent/main.py).

Every agent setting is a flag; the agent reads no environment variable of its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

from agent.main import Agent, AgentSettings
from cli.env import tenax_home
from common.etcd import EtcdError
from protos.keys import DEFAULT_PREFIX


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def default_work_dir(node_id: str) -> Path:
    return tenax_home() / "agents" / node_id


def register(sub) -> None:
    p = sub.add_parser("agent", help="run the node agent (one per host)",
                       description="Register this host, publish telemetry and run the workers plans give it.")
    p.add_argument("--etcd", default="http://127.0.0.1:2379",
                   help="etcd endpoint(s), http[s]://host:port[,...] (default http://127.0.0.1:2379)")
    p.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help=f"cluster key prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--node-id", default=socket.gethostname(), help="node name (default: hostname)")
    p.add_argument("--slots", type=int, default=None,
                   help="worker slots (default: one per GPU NVML finds, see --gpus-per-slot; --cpu-slots without GPUs)")
    p.add_argument("--cpu-slots", type=int, default=1, help="slots on a host without GPUs (default 1)")
    p.add_argument("--gpus-per-slot", type=int, default=1, help="GPUs per slot (default 1)")
    p.add_argument("--slot-devices", default="", metavar="MAP",
                   help="explicit slot -> GPU map, slots separated by ';' (e.g. '0;0;1;1': two slots per GPU, "
                        "'0,1;2,3': two GPUs per slot)")
    p.add_argument("--lease-ttl", type=int, default=5, help="node lease TTL in seconds (default 5)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="logs, launch files and run dirs (default: $TENAX_HOME/agents/<node>)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                   help="jobs' disk checkpoints go to DIR/<job>; give every agent the same shared filesystem "
                        "path so a recovery on any node reads them (default: each node's own work dir)")
    p.add_argument("--http", type=_host_port, default=("127.0.0.1", 0),
                   help="HOST:PORT of /metrics, /healthz, /logs (port 0: ephemeral; default 127.0.0.1:0)")
    p.add_argument("--advertise-host", default="", help="host others reach this agent at")
    p.add_argument("--telemetry-interval", type=float, default=3.0, help="seconds between telemetry samples")
    p.add_argument("--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--worker-memory-limit-gb", type=float, default=0.0,
                   help="host memory (resident set, GB) a worker may use before it is killed and its job "
                        "fails; 0: only a job's resources.host_memory_gb (the smaller of the two applies)")
    p.add_argument("--etcd-ca", default="", help="CA of etcd's certificate, for https:// endpoints")
    p.add_argument("--etcd-cert", default="", help="client certificate for etcd")
    p.add_argument("--etcd-key", default="", help="its private key")
    p.add_argument("--worker-command", default="",
                   help="worker command line (default: python -m trainer.worker); for tests")
    p.add_argument("--logs-auth", choices=("token", "off"), default="token",
                   help="GET /logs needs an API token of role viewer or above, checked in etcd (token, the "
                        "default), or is open (off: only for a controller running --no-auth)")
    p.add_argument("--data-root", type=Path, action="append", default=[], metavar="DIR",
                   help="a directory jobs may read token files from (data.path); repeatable. Paths resolve "
                        "inside a root only (no '..', no symlink out); without any, jobs get synthetic data only")
    p.add_argument("--fake-gpu-dir", type=Path, default=None, metavar="DIR",
                   help="test hook: read GPU telemetry from DIR/<node-id>.json (a JSON list of GPU samples) "
                        "instead of NVML, to inject XID/ECC errors without a GPU")
    p.set_defaults(func=_run)


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """The agent's settings, from its flags only; ValueError names the bad flag."""
    return AgentSettings(
        etcd=args.etcd, etcd_prefix=args.etcd_prefix, node_id=args.node_id, slots=args.slots,
        lease_ttl_s=args.lease_ttl, work_dir=args.work_dir or default_work_dir(args.node_id),
        http_host=args.http[0], http_port=args.http[1], advertise_host=args.advertise_host,
        telemetry_interval_s=args.telemetry_interval, kill_grace_s=args.kill_grace,
        worker_memory_limit_gb=args.worker_memory_limit_gb,
        worker_command=shlex.split(args.worker_command), etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert,
        etcd_key=args.etcd_key, fake_gpu_dir=args.fake_gpu_dir, logs_auth=args.logs_auth, cpu_slots=args.cpu_slots,
        gpus_per_slot=args.gpus_per_slot, slot_devices=args.slot_devices, data_roots=list(args.data_root),
        checkpoint_dir=args.checkpoint_dir).validate()


def _run(args: argparse.Namespace) -> int:
    # gRPC core logs an INFO line on every fork (each worker start); keep its errors only.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"tenax agent: {exc}")
        return 2
    try:
        code = asyncio.run(_serve(settings))
    except EtcdError as exc:  # etcd refused the agent (e.g. permission denied): retrying cannot help
        print(f"tenax agent: {exc}", file=sys.stderr)
        code = 1
    _exit_without_finalisation(code)


def _exit_without_finalisation(code: int) -> None:
    """End the agent process once its shutdown is done (workers stopped, lease revoked, etcd
    closed): tearing down the interpreter with torch loaded (the rendezvous store) takes seconds
    on a loaded host and has nothing left to clean up, and `tenax down` waits for it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(settings: AgentSettings) -> int:
    try:
        agent = Agent(settings)
    except ValueError as exc:  # slot flags this host cannot honour (e.g. more slots than GPUs, no map)
        print(f"tenax agent: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    await agent.run()
    return 0
