"""Control-plane benchmark: node-loss detection latency and controller CPU at N nodes.

For each N, the script starts (on an embedded etcd it starts itself) a real
controller process and N simulated agents spread over a few processes
(asyncio). Every agent holds its own lease (TTL ``--ttl``, refreshed every
TTL/3 like the real agent), registers NodeInfo under it and publishes a
telemetry sample every ``--telemetry-every`` seconds. Once the controller
lists all N nodes READY, the script measures the controller's CPU over a
steady window, then "kills" ``--kill-fraction`` of the agents (their keepalives
and telemetry stop, as when a host dies) and reads, for each, the moment the
controller recorded the node NOT_READY (``RegistryRecord.lost_at``, written by
the leader when the lease-expiry delete reaches it).

Reported per N:

* kill -> NOT_READY: from the agent's last successful keepalive (the last
  moment it was provably alive) to the controller's NOT_READY time. Goal
  p99 <= TTL + 1 s at N = 1000.
* expiry -> NOT_READY: the same minus the TTL (etcd's expiry granularity plus
  the controller's reaction).
* controller CPU (percent of one core) in steady state and during the loss burst.

Run: ``.venv/bin/python bench/control_plane.py`` (about 2-4 minutes), or
``--sizes 100,1000 --procs 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.embedded_etcd import start_etcd  # noqa: E402
from common.etcd import Etcd, EtcdError, EtcdUnavailable  # noqa: E402
from controller.state import read_prefix_paged  # noqa: E402
from protos.keys import Keys  # noqa: E402
from protos.records import NodeHealthRecord, NodeRecord, RegistryRecord  # noqa: E402


# ------------------------------------------------------------------ simulated agents (child processes)
class SimAgent:
    def __init__(self, etcd: Etcd, keys: Keys, node: str, ttl_s: int, telemetry_every_s: float) -> None:
        self.etcd, self.keys, self.node = etcd, keys, node
        self.ttl_s, self.telemetry_every_s = ttl_s, telemetry_every_s
        self.lease = 0
        self.last_refresh = 0.0
        self.alive = True
        self.task: asyncio.Task | None = None

    async def register(self) -> None:
        self.lease = await self.etcd.grant_lease(self.ttl_s)
        rec = NodeRecord(id=self.node, slots=8, hostname=self.node, address="127.0.0.1:1",
                         store_address="127.0.0.1:2", started=time.time())
        await self.etcd.put(self.keys.node(self.node), rec.to_json(), lease=self.lease)
        self.last_refresh = time.time()

    async def run(self) -> None:
        next_refresh = time.monotonic() + random.uniform(0, self.ttl_s / 3)
        next_health = time.monotonic() + random.uniform(0, self.telemetry_every_s)
        while self.alive:
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    await self.etcd.refresh_lease(self.lease)
                    self.last_refresh = time.time()
                    next_refresh = now + self.ttl_s / 3
                if now >= next_health:
                    sample = NodeHealthRecord(time=time.time(), cpu_percent=random.uniform(0, 100),
                                              memory_used=random.randint(1, 1 << 30), memory_total=1 << 34)
                    await self.etcd.put(self.keys.node_health(self.node), sample.to_json(), lease=self.lease)
                    next_health = now + self.telemetry_every_s
            except (EtcdError, EtcdUnavailable):
                pass  # like the real agent: keep trying
            await asyncio.sleep(max(min(next_refresh, next_health) - time.monotonic(), 0.01))


def agent_process(etcd_url: str, prefix: str, nodes: list[str], ttl_s: int, telemetry_every_s: float, conn) -> None:
    async def main() -> None:
        keys = Keys(prefix)
        async with Etcd(etcd_url, timeout_s=10) as etcd:
            agents = {n: SimAgent(etcd, keys, n, ttl_s, telemetry_every_s) for n in nodes}
            for chunk in range(0, len(nodes), 50):
                await asyncio.gather(*(agents[n].register() for n in nodes[chunk:chunk + 50]))
            for a in agents.values():
                a.task = asyncio.create_task(a.run())
            conn.send("ready")
            while True:
                cmd, arg = await asyncio.to_thread(conn.recv)
                if cmd == "kill":
                    for n in arg:
                        agents[n].alive = False
                        agents[n].task.cancel()
                    conn.send({n: agents[n].last_refresh for n in arg})
                elif cmd == "stop":
                    for a in agents.values():
                        a.alive = False
                        if a.task:
                            a.task.cancel()
                    for chunk in range(0, len(nodes), 50):
                        await asyncio.gather(*(etcd.revoke_lease(agents[n].lease) for n in nodes[chunk:chunk + 50]),
                                             return_exceptions=True)
                    conn.send("stopped")
                    return
    asyncio.run(main())


# ------------------------------------------------------------------ controller process
def start_controller(etcd_url: str, prefix: str, log_path: Path) -> tuple[subprocess.Popen, dict]:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "controller", "--etcd", etcd_url, "--prefix", prefix,
                             "--metrics-port", "-1", "--id", "bench", "--tls", "plaintext", "--no-auth"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        log.close()
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"controller did not start ({log_path}):\n{tail}")
    return proc, json.loads(line)


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


async def registry_state(etcd_url: str, keys: Keys) -> dict[str, RegistryRecord]:
    async with Etcd(etcd_url, timeout_s=20) as etcd:
        out = {}
        for kv in await read_prefix_paged(etcd, keys.registry(), lambda key: True):
            out[kv.key[len(keys.registry()):]] = RegistryRecord.from_json(kv.value)
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


# ------------------------------------------------------------------ one round
def run_round(etcd_url: str, n: int, args: argparse.Namespace, workdir: Path) -> dict:
    prefix = f"/bench{n}-{int(time.time())}"
    keys = Keys(prefix)
    ctl, _info = start_controller(etcd_url, prefix, workdir / f"controller-{n}.log")
    ctl_ps = psutil.Process(ctl.pid)
    nodes = [f"sim-{i:05d}" for i in range(n)]
    groups = [nodes[i::args.procs] for i in range(args.procs)]
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    result: dict = {"n": n}
    try:
        t0 = time.monotonic()
        for group in groups:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=agent_process, args=(etcd_url, prefix, group, args.ttl, args.telemetry_every, child),
                            daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        for c in conns:
            if not c.poll(args.ready_timeout):
                raise RuntimeError(f"agents did not register within {args.ready_timeout} s at N={n}")
            c.recv()
        # the controller has seen everyone once every node is in its registry
        deadline = time.monotonic() + args.ready_timeout
        while True:
            reg = asyncio.run(registry_state(etcd_url, keys))
            ready = sum(1 for r in reg.values() if r.lost_at is None)
            if ready >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller saw {ready}/{n} nodes within {args.ready_timeout} s")
            time.sleep(0.5)
        result["register_s"] = time.monotonic() - t0

        cpu0, w0 = sum(ctl_ps.cpu_times()[:2]), time.monotonic()
        time.sleep(args.steady)
        result["cpu_steady"] = 100 * (sum(ctl_ps.cpu_times()[:2]) - cpu0) / (time.monotonic() - w0)

        victims = random.Random(n).sample(nodes, max(1, int(n * args.kill_fraction)))
        last_refresh: dict[str, float] = {}
        for group, c in zip(groups, conns):
            mine = [v for v in victims if v in set(group)]
            c.send(("kill", mine))
        for c in conns:
            last_refresh.update(c.recv())
        cpu1, w1 = sum(ctl_ps.cpu_times()[:2]), time.monotonic()
        deadline = time.monotonic() + args.ttl + 20
        while True:
            reg = asyncio.run(registry_state(etcd_url, keys))
            lost = {v: reg[v].lost_at for v in victims if v in reg and reg[v].lost_at is not None}
            if len(lost) == len(victims) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        result["cpu_burst"] = 100 * (sum(ctl_ps.cpu_times()[:2]) - cpu1) / (time.monotonic() - w1)
        survivors_marked = sum(1 for node, r in reg.items() if r.lost_at is not None and node not in victims)
        kill_to_nr = [lost[v] - last_refresh[v] for v in lost]
        result.update(
            killed=len(victims), detected=len(lost), false_positives=survivors_marked,
            p50=statistics.median(kill_to_nr) if kill_to_nr else float("nan"),
            p99=pct(kill_to_nr, 99) if kill_to_nr else float("nan"),
            max=max(kill_to_nr) if kill_to_nr else float("nan"),
            expiry_p50=statistics.median(x - args.ttl for x in kill_to_nr) if kill_to_nr else float("nan"),
            expiry_p99=pct([x - args.ttl for x in kill_to_nr], 99) if kill_to_nr else float("nan"),
            ctl_rss_mb=ctl_ps.memory_info().rss / 2**20,
        )
    finally:
        for c in conns:
            try:
                c.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for c in conns:
            try:
                if c.poll(30):
                    c.recv()
            except (EOFError, OSError):
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        stop_process_group(ctl)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,2000", help="comma-separated N values")
    parser.add_argument("--procs", type=int, default=4, help="agent simulator processes")
    parser.add_argument("--ttl", type=int, default=5, help="agent lease TTL, seconds")
    parser.add_argument("--telemetry-every", type=float, default=3.0, help="telemetry period per agent, seconds")
    parser.add_argument("--kill-fraction", type=float, default=0.1, help="share of agents killed per round")
    parser.add_argument("--steady", type=float, default=10.0, help="steady-state CPU window, seconds")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="registration limit per round, seconds")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    workdir = Path(tempfile.mkdtemp(prefix="tenax-bench-"))
    etcd = start_etcd(workdir / "etcd", log_path=workdir / "etcd.log")
    rows = []
    try:
        for n in sizes:
            print(f"N={n}: running ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_round(etcd.url, n, args, workdir))
            except (RuntimeError, EtcdError, EtcdUnavailable) as exc:
                print(f"N={n}: machine did not hold it: {exc}", file=sys.stderr, flush=True)
                break
    finally:
        etcd.kill()
    print(f"\nlease TTL {args.ttl} s, telemetry every {args.telemetry_every} s, {args.procs} agent processes, "
          f"{os.cpu_count()} CPUs; goal p99(kill->NOT_READY) <= TTL+1 = {args.ttl + 1} s at N=1000")
    header = (f"{'N':>6} {'killed':>6} {'seen':>5} {'false+':>6} {'kill->NR p50':>12} {'p99':>6} {'max':>6} "
              f"{'expiry->NR p50':>14} {'p99':>6} {'ctl CPU steady':>14} {'burst':>6} {'RSS MB':>7} {'reg s':>6}")
    print(header)
    for r in rows:
        print(f"{r['n']:>6} {r['killed']:>6} {r['detected']:>5} {r['false_positives']:>6} {r['p50']:>11.2f}s "
              f"{r['p99']:>5.2f}s {r['max']:>5.2f}s {r['expiry_p50']:>13.2f}s {r['expiry_p99']:>5.2f}s "
              f"{r['cpu_steady']:>13.1f}% {r['cpu_burst']:>5.1f}% {r['ctl_rss_mb']:>7.0f} {r['register_s']:>6.1f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
