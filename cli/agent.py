"""``tenax agent``: flags -> ``AgentSettings`` -> the agent service (agent/main.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
from pathlib import Path

from agent.main import Agent, AgentSettings


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def default_work_dir(node_id: str) -> Path:
    home = Path(os.environ.get("TENAX_HOME") or Path.home() / ".tenax")
    return home / "agents" / node_id


def register(sub) -> None:
    p = sub.add_parser("agent", help="run the node agent (one per host)",
                       description="Register this host, publish telemetry and run the workers plans give it.")
    p.add_argument("--etcd", default=os.environ.get("TENAX_ETCD", "http://127.0.0.1:2379"),
                   help="etcd endpoint (default: $TENAX_ETCD or http://127.0.0.1:2379)")
    p.add_argument("--etcd-prefix", default=os.environ.get("TENAX_ETCD_PREFIX", "/tenax"))
    p.add_argument("--node-id", default=socket.gethostname(), help="node name (default: hostname)")
    p.add_argument("--slots", type=int, default=None,
                   help="worker slots (default: GPUs found through NVML, else 1)")
    p.add_argument("--lease-ttl", type=int, default=5, help="node lease TTL in seconds (default 5)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="logs, launch files and run dirs (default: $TENAX_HOME/agents/<node>)")
    p.add_argument("--http", type=_host_port, default=("127.0.0.1", 0),
                   help="HOST:PORT of /metrics, /healthz, /logs (port 0: ephemeral; default 127.0.0.1:0)")
    p.add_argument("--advertise-host", default="", help="host others reach this agent at")
    p.add_argument("--telemetry-interval", type=float, default=3.0, help="seconds between telemetry samples")
    p.add_argument("--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--etcd-ca", default=os.environ.get("TENAX_ETCD_CA", ""),
                   help="CA of etcd's certificate, for https:// endpoints (default $TENAX_ETCD_CA)")
    p.add_argument("--etcd-cert", default=os.environ.get("TENAX_ETCD_CERT", ""), help="client certificate for etcd")
    p.add_argument("--etcd-key", default=os.environ.get("TENAX_ETCD_KEY", ""), help="its private key")
    p.add_argument("--worker-command", default="",
                   help="worker command line (default: python -m trainer.worker); for tests")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # gRPC core logs an INFO line on every fork (each worker start); keep its errors only.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        settings = AgentSettings(
            etcd=args.etcd, etcd_prefix=args.etcd_prefix, node_id=args.node_id, slots=args.slots,
            lease_ttl_s=args.lease_ttl, work_dir=args.work_dir or default_work_dir(args.node_id),
            http_host=args.http[0], http_port=args.http[1], advertise_host=args.advertise_host,
            telemetry_interval_s=args.telemetry_interval, kill_grace_s=args.kill_grace,
            worker_command=shlex.split(args.worker_command), etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert,
            etcd_key=args.etcd_key).validate()
    except ValueError as exc:
        print(f"tenax agent: {exc}")
        return 2
    return asyncio.run(_serve(settings))


async def _serve(settings: AgentSettings) -> int:
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    await agent.run()
    return 0
