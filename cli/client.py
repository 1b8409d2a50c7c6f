"""Client subcommands of `tenax`: submit, jobs, job, nodes, cordon,
uncordon, drain, cancel, logs.

Controller address: ``--controller``, else ``$TENAX_CONTROLLER``, else the local
cluster recorded by ``tenax up`` (``cli.local.local_cluster_state()``).
An address may list several replicas (``host:port,host:port``); a call that
finds one UNAVAILABLE tries the next, so the CLI rides over a failover.

Errors print one line (``tenax: NOT_FOUND: job 'x' not found``) and exit 1;
every call has a deadline (``--timeout``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf import json_format

from cli import credentials
from cli.env import CONTROLLER, controller_from_env
from cli.local import local_cluster_state
from common.spec import JobSpec, load_spec_text
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 10.0
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ------------------------------------------------------------------ plumbing
def controller_addresses(args: argparse.Namespace) -> list[str]:
    value = getattr(args, "controller", None) or controller_from_env()
    if not value:
        value = _local_controller(_local_state())
    if not value:
        raise CliError(f"no controller address: pass --controller HOST:PORT, set {CONTROLLER}, "
                       "or start a local cluster with `tenax up`")
    return [a.strip() for a in value.split(",") if a.strip()]


def _local_state() -> dict | None:
    """The record `tenax up` wrote, or None (a missing or unreadable state file reads as None)."""
    return local_cluster_state()


def _local_controller(state: dict | None) -> str | None:
    if not state:
        return None
    controllers = state.get("controllers")
    if isinstance(controllers, list) and controllers:
        return ",".join(str(c) for c in controllers)
    return state.get("controller")


# Every replica serves every service; Client.call picks the stub by this name.
_STUBS = {
    "job": pb_grpc.JobServiceStub,
    "node": pb_grpc.NodeServiceStub,
    "chaos": pb_grpc.ChaosServiceStub,
}


class Client:
    """Calls one RPC on the first replica that answers (UNAVAILABLE -> next).

    Channels carry TLS and the caller's token (``cli.credentials.client_channel``:
    --ca-file/--token-file/--plaintext, else the local cluster's CA and admin token).
    """

    def __init__(self, addresses: list[str], timeout_s: float, args: argparse.Namespace | None = None) -> None:
        self.addresses = addresses
        self.timeout_s = timeout_s
        self.args = args or argparse.Namespace()
        self._local = _local_state()

    def _channel(self, address: str) -> grpc.Channel:
        try:
            return credentials.client_channel(self.args, address,
                                           local=credentials.local_security_for(address, self._local))
        except (ValueError, OSError) as exc:
            raise CliError(str(exc)) from exc

    def call(self, service: str, method: str, request: Any) -> Any:
        """Call ``method`` of ``service`` (a key of ``_STUBS``) on the first replica that answers."""
        last: grpc.RpcError | None = None
        for address in self.addresses:
            channel = self._channel(address)
            try:
                stub = _STUBS[service](channel)
                return getattr(stub, method)(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = exc
            finally:
                channel.close()
        assert last is not None
        raise last

    def token(self) -> str | None:
        """The caller's API token (agents check it on GET /logs), as its channels carry it."""
        return credentials.client_token(self.args, credentials.local_security_for(self.addresses[0], self._local))

    def watch(self, job_id: str, deadline_s: float):
        """Yield JobEvents; on a lost stream, reconnect (any replica) until the deadline."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for address in self.addresses:
                channel = self._channel(address)
                try:
                    stub = pb_grpc.JobServiceStub(channel)
                    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id),
                                               timeout=max(end - time.monotonic(), 1.0)):
                        yield event
                    return
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        raise
                finally:
                    channel.close()
            time.sleep(0.5)
        raise CliError(f"gave up waiting for job {job_id} after {deadline_s:.0f} s")


def list_all_jobs(client: Client, max_pages: int = 10_000) -> list:
    """Every job, one ListJobs page at a time (a reply stays far below gRPC's message limit)."""
    jobs, token = [], ""
    for _page in range(max_pages):
        reply = client.call("job", "ListJobs", pb.ListJobsRequest(page_token=token))
        jobs.extend(reply.jobs)
        token = reply.next_page_token
        if not token:
            break
    return jobs


def _client(args: argparse.Namespace) -> Client:
    return Client(controller_addresses(args), args.timeout, args)


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One-line errors and exit codes instead of tracebacks."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except grpc.RpcError as exc:
            print(f"tenax: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except CliError as exc:
            print(f"tenax: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 0
    run.__name__ = fn.__name__
    return run


def _to_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _plain(msg: Any) -> dict[str, Any]:
    """A message as a dict of native values, every field included (MessageToDict writes int64 as
    strings, which a --json reader would have to parse back)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.is_repeated:
            out[field.name] = [_plain(v) for v in value]
        elif field.message_type is not None:
            out[field.name] = _plain(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _fmt_duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    return str(datetime.timedelta(seconds=int(seconds)))


# ------------------------------------------------------------------ records for --json
def job_record(job: pb.Job) -> dict[str, Any]:
    st = job.status
    return {
        "id": job.id,
        "name": job.spec.name,
        "phase": pb.JobPhase.Name(st.phase),
        "message": st.message,
        "step": st.step,
        "steps": job.spec.steps,
        "loss": st.loss,
        "tokens_per_s": st.tokens_per_s,
        "eta_s": st.eta_s,
        "generation": st.generation,
        "layout": {"dp": st.layout.dp, "pp": st.layout.pp, "zero_stage": st.layout.zero_stage},
        "workers": [{"rank": w.rank, "node": w.node, "slot": w.slot, "pid": w.pid, "state": w.state,
                     "exit_code": w.exit_code, "signal": w.signal} for w in st.workers],
        "recoveries": [_to_dict(r) for r in st.recoveries],
        "recoverable_step": st.recoverable_step,
        "redundancy": st.redundancy,
        "next_failure_cost": st.next_failure_cost,
        "goodput": _plain(st.goodput),
        "created": st.created,
        "updated": st.updated,
    }


def node_record(node: pb.NodeInfo) -> dict[str, Any]:
    return {
        "id": node.id,
        "hostname": node.hostname,
        "address": node.address,
        "state": pb.NodeState.Name(node.state),
        "slots": node.slots,
        "used_slots": node.used_slots,
        "condition": pb.NodeCondition.Name(node.condition).replace("FAILED_CONDITION", "FAILED"),
        "condition_reason": node.condition_reason,
        "labels": dict(node.labels),
        "store_address": node.store_address,
        "slot_devices": list(node.slot_devices),
        # everything the agent samples (NodeHealth: host, and per GPU name, memory, utilisation,
        # temperature, power, clocks, throttle reasons, ECC, retired pages, XIDs, remapped rows,
        # PCIe replays, NVLink errors); {} until the agent's first sample
        "health": _plain(node.health) if node.HasField("health") else {},
    }


GIB = 1024 ** 3


def gpu_flags(gpu: dict[str, Any]) -> list[str]:
    """The health flags of one GPU (its `tenax nodes` line): what is wrong, or [] when nothing. Pure."""
    flags = []
    if int(gpu.get("ecc_volatile_dbe", 0) or 0):
        flags.append(f"ECC-DBE={gpu['ecc_volatile_dbe']}")
    if gpu.get("xid_events"):
        flags.append("XID=" + ",".join(str(x) for x in gpu["xid_events"]))
    if gpu.get("throttle_reasons"):
        flags.append("THROTTLE=" + ",".join(gpu["throttle_reasons"]))
    if int(gpu.get("retired_pages", 0) or 0):
        flags.append(f"RETIRED-PAGES={gpu['retired_pages']}")
    if int(gpu.get("remapped_rows_pending", 0) or 0):
        flags.append("REMAP-PENDING")
    if int(gpu.get("remapped_rows_failed", 0) or 0):
        flags.append("REMAP-FAILED")
    if int(gpu.get("pcie_replay_errors", 0) or 0):
        flags.append(f"PCIE-REPLAYS={gpu['pcie_replay_errors']}")
    if int(gpu.get("nvlink_errors", 0) or 0):
        flags.append(f"NVLINK-ERRORS={gpu['nvlink_errors']}")
    return flags


def gpu_line(gpu: dict[str, Any]) -> str:
    used, total = int(gpu.get("memory_used", 0) or 0) / GIB, int(gpu.get("memory_total", 0) or 0) / GIB
    flags = gpu_flags(gpu)
    return (f"  gpu {int(gpu.get('index', 0) or 0):<2} {str(gpu.get('name', '') or '?')[:24]:<24} "
            f"mem {used:6.1f}/{total:5.1f} GiB  util {float(gpu.get('utilization', 0) or 0):3.0f}%  "
            f"{float(gpu.get('temperature_c', 0) or 0):3.0f}°C  {float(gpu.get('power_w', 0) or 0):5.0f} W  "
            f"{' '.join(flags) if flags else 'ok'}")


# ------------------------------------------------------------------ commands
@_command
def cmd_submit(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read job file {args.file}: {exc}") from exc
    try:
        # the same check as the server: fail before any network call
        spec = JobSpec.from_dict(load_spec_text(text, args.file))
    except ValueError as exc:
        raise CliError(f"invalid job spec in {args.file}: {exc}") from exc
    msg = json_format.ParseDict(spec.to_dict(), pb.JobSpec())
    client = _client(args)
    # One request id for every attempt: a retry on another replica after UNAVAILABLE gets the
    # job the first attempt may already have made, never a second one.
    job = client.call("job", "SubmitJob", pb.SubmitJobRequest(spec=msg, request_id=secrets.token_hex(16)))
    if args.json and not args.wait:
        _print_json(job_record(job))
        return 0
    print(f"job {job.id} submitted", file=sys.stderr if args.json else sys.stdout, flush=True)
    if not args.wait:
        return 0
    return _wait(client, job.id, spec.steps, args)


def _wait(client: Client, job_id: str, steps: int, args: argparse.Namespace) -> int:
    """Follow the job with a live progress line until it ends; 0 iff SUCCEEDED."""
    phase, step, loss, tps, eta = "PENDING", 0, None, 0.0, 0.0
    tty = sys.stdout.isatty() and not args.json
    nl = "\n" if tty else ""  # end the progress line before printing a note
    for event in client.watch(job_id, args.wait_timeout):
        kind = event.WhichOneof("event")
        if kind == "phase":
            phase = pb.JobPhase.Name(event.phase)
        elif kind == "progress":
            p = event.progress
            step, loss, tps = p.step, p.loss, p.tokens_per_s
            eta = (steps - step) * (p.step_time_s or 0.0)
        elif kind == "plan":
            if not args.json:
                print(f"{nl}plan generation {event.plan.generation}: "
                      f"{len(event.plan.workers)} workers ({event.plan.reason})", flush=True)
            continue
        elif kind == "recovery":
            if not args.json:
                r = event.recovery
                print(f"{nl}recovery: {r.cause} (total {r.total_s:.2f} s)", flush=True)
            continue
        elif kind == "entry":
            if not args.json and event.entry.kind not in ("plan", "recovery", "phase"):  # those print above
                print(f"{nl}event: {_event_line(event_record(event.entry))}", flush=True)
            continue
        if args.json:
            continue
        width = max(len(str(steps)), 1)
        bar_len = 20
        done = int(bar_len * min(step, steps) / max(steps, 1))
        line = (f"{job_id} {phase:<9} [{'#' * done}{'.' * (bar_len - done)}] step {step:>{width}}/{steps}"
                f"  loss {loss if loss is not None else float('nan'):.4f}  {tps:,.0f} tok/s  ETA {_fmt_duration(eta)}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        if phase in TERMINAL:
            break
    if tty:
        print()
    job = client.call("job", "GetJob", pb.GetJobRequest(job_id=job_id))
    final = pb.JobPhase.Name(job.status.phase)
    if args.json:
        _print_json(job_record(job))
    else:
        print(f"job {job_id} {final}: {job.status.message}")
    return 0 if final == "SUCCEEDED" else 1


@_command
def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = list_all_jobs(_client(args))
    if args.json:
        _print_json([job_record(j) for j in jobs])
        return 0
    print(f"{'ID':<32} {'PHASE':<10} {'STEP':>11} {'LOSS':>8} {'GEN':>4} {'WORKERS':>7}  MESSAGE")
    for j in jobs:
        r = job_record(j)
        print(f"{r['id']:<32} {r['phase']:<10} {str(r['step']) + '/' + str(r['steps']):>11} {r['loss']:>8.4f} "
              f"{r['generation']:>4} {len(r['workers']):>7}  {r['message']}")
    return 0


@_command
def cmd_job(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.metrics:
        steps = client.call("job", "GetJobMetrics", pb.GetJobMetricsRequest(job_id=args.id)).steps
        for s in steps:
            line = {"step": s.step, "loss": s.loss, "generation": s.generation, "time": s.time,
                    "step_time_s": s.step_time_s, "tokens_per_s": s.tokens_per_s}
            if s.HasField("eval_loss"):
                line.update(eval_loss=s.eval_loss, eval_perplexity=s.eval_perplexity)
            print(json.dumps(line))
        return 0
    job = client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id))
    r = job_record(job)
    r["events"] = [event_record(e) for e in _events(client, job.id, limit=args.events)]
    if args.json:
        _print_json(r)
        return 0
    lay = r["layout"]
    print(f"job        {r['id']}\nphase      {r['phase']} ({r['message']})\n"
          f"step       {r['step']}/{r['steps']}  loss {r['loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  "
          f"ETA {_fmt_duration(r['eta_s'])}\n"
          f"generation {r['generation']}  layout dp={lay['dp']} pp={lay['pp']} zero={lay['zero_stage']}")
    if r["redundancy"]:
        print(f"redundancy {r['redundancy']}\nat risk    {r['next_failure_cost']}")
    g = r["goodput"]
    if g["wall_s"] > 0:
        print(f"goodput    ETTR {g['ratio']:.1%} of {g['wall_s']:.1f} s; lost: pending {g['pending_s']:.1f} s, "
              f"recovery {g['recovery_s']:.1f} s, replayed steps {g['replayed_s']:.1f} s, stalls {g['stall_s']:.1f} s")
    print(f"{'RANK':>4} {'NODE':<24} {'SLOT':>4} {'PID':>8} STATE")
    for w in r["workers"]:
        print(f"{w['rank']:>4} {w['node']:<24} {w['slot']:>4} {w['pid']:>8} {w['state']}")
    for rec in r["recoveries"]:
        print(f"recovery: {json.dumps(rec, sort_keys=True)}")
    if r["events"]:
        print(f"events (latest {len(r['events'])}; all: tenax events {r['id']})")
        for e in r["events"]:
            print(_event_line(e))
    return 0


def event_record(e: pb.JobEventEntry) -> dict[str, Any]:
    try:
        data = json.loads(e.data_json) if e.data_json else {}
    except ValueError:
        data = {"raw": e.data_json}
    return {"time": e.time, "kind": e.kind, "step": e.step, "generation": e.generation, "message": e.message,
            "action": e.action, "data": data}


def _events(client: Client, job_id: str, *, limit: int = 0, since: float = 0.0) -> list[pb.JobEventEntry]:
    return list(client.call("job", "ListJobEvents",
                            pb.ListJobEventsRequest(job_id=job_id, limit=limit, since_time=since)).events)


def _event_line(e: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S.%f")[:-3] if e["time"] else "-"
    step = f"step {e['step']}" if e["step"] else ""
    action = f"  -> {e['action']}" if e["action"] else ""
    return f"{when} {e['kind']:<11} {step:<10} {e['message']}{action}"


@_command
def cmd_events(args: argparse.Namespace) -> int:
    """A job's timeline; --follow prints new events until the job ends."""
    client = _client(args)
    since = 0.0
    first = True
    while True:
        found = _events(client, args.id, limit=args.limit if first else 0, since=since)
        first = False
        for e in found:
            r = event_record(e)
            print(json.dumps(r, sort_keys=True) if args.json else _event_line(r), flush=True)
            since = max(since, e.time)
        if not args.follow:
            return 0
        phase = pb.JobPhase.Name(client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id)).status.phase)
        if phase in TERMINAL and not found:
            return 0
        time.sleep(1.0)


def _print_nodes(nodes: list[pb.NodeInfo], as_json: bool) -> None:
    records = [node_record(n) for n in nodes]
    if as_json:
        _print_json(records)
        return
    print(f"{'NODE':<24} {'STATE':<10} {'SLOTS':>5} {'USED':>4} {'CONDITION':<10} REASON")
    for r in records:
        print(f"{r['id']:<24} {r['state']:<10} {r['slots']:>5} {r['used_slots']:>4} {r['condition']:<10} "
              f"{r['condition_reason']}")
        for gpu in r["health"].get("gpus", []):
            print(gpu_line(gpu))


_NODE_ACTIONS = {"cordon": "CordonNode", "uncordon": "UncordonNode", "drain": "DrainNode"}


@_command
def cmd_nodes(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action:
        if args.action not in _NODE_ACTIONS:
            raise CliError(f"unknown node action {args.action!r}; use cordon, uncordon or drain")
        if not args.node:
            raise CliError(f"`tenax nodes {args.action}` needs a NODE")
        node = client.call("node", _NODE_ACTIONS[args.action], pb.NodeRequest(node_id=args.node))
        _print_nodes([node], args.json)
        return 0
    _print_nodes(list(client.call("node", "ListNodes", pb.ListNodesRequest()).nodes), args.json)
    return 0


def _node_action(action: str) -> Callable[[argparse.Namespace], int]:
    @_command
    def run(args: argparse.Namespace) -> int:
        node = _client(args).call("node", _NODE_ACTIONS[action], pb.NodeRequest(node_id=args.node))
        _print_nodes([node], args.json)
        return 0
    return run


@_command
def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).call("job", "CancelJob", pb.CancelJobRequest(job_id=args.id))
    if args.json:
        _print_json(job_record(job))
    else:
        print(f"job {job.id}: cancel requested ({pb.JobPhase.Name(job.status.phase)})")
    return 0


@_command
def cmd_logs(args: argparse.Namespace) -> int:
    """Logs live on the agents, one file per worker process (node, slot, generation it started in).
    Each agent lists its processes of the job at GET /logs/<job> (with the rank each held in every
    plan generation); the CLI picks the processes asked for and reads /logs/<job>/<log name>."""
    client = _client(args)
    job = client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id))
    nodes = {n.id: n for n in client.call("node", "ListNodes", pb.ListNodesRequest()).nodes}
    token = client.token()
    wanted_nodes = {w.node for w in job.status.workers} | ({args.node} if args.node else set())
    try:  # nodes the job ran on before (a failed worker's node may be in no plan any more)
        for e in _events(client, job.id, limit=1000):
            data = event_record(e)["data"]
            if isinstance(data.get("node"), str):
                wanted_nodes.add(data["node"])
            wanted_nodes.update(str(w).split("/")[0] for w in data.get("workers") or [] if isinstance(w, str))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    processes: list[tuple[str, dict[str, Any]]] = []
    legacy: list[str] = []
    for node_id in sorted(wanted_nodes):
        node = nodes.get(node_id)
        if node is None or not node.address:
            print(f"tenax: node {node_id} is unknown or has no address: its logs are not reachable", file=sys.stderr)
            continue
        index = _fetch_index(node.address, job.id, token, args.timeout)
        if index is None:
            legacy.append(node_id)
            continue
        processes += [(node.address, entry) for entry in index]
    generation = job.status.generation
    chosen = select_logs([e for _, e in processes], rank=args.rank, generation=args.generation, node=args.node,
                         slot=args.slot, every=args.all, current=generation)
    by_id = {id(e): address for address, e in processes}
    targets = [(by_id[id(e)], e) for e in chosen]
    if not targets and legacy and args.rank is not None and args.generation is None and not args.all:
        # agents without a log index: the worker holding the rank now
        w = next((w for w in job.status.workers if w.rank == args.rank and w.node in legacy), None)
        if w is not None:
            targets = [(nodes[w.node].address, {"node": w.node, "slot": w.slot, "log": str(w.rank), "ranks": {}})]
    if not targets:
        what = (f"rank {args.rank}" + (f" in generation {args.generation}" if args.generation is not None else "")
                if args.rank is not None else f"node {args.node}" + (f" slot {args.slot}" if args.slot is not None
                                                                     else "") if args.node else "current worker")
        known = ", ".join(_describe_process(e) for _, e in processes) or "none"
        raise CliError(f"job {args.id}: no log of a {what} (processes with logs: {known})")
    offsets = [0] * len(targets)
    many = len(targets) > 1
    for _, entry in targets:  # which process is which (stderr for one: stdout stays the log itself)
        print(f"==> {_describe_process(entry)} <==", file=sys.stdout if many else sys.stderr, flush=True)
    while True:
        got_any = False
        for i, (address, entry) in enumerate(targets):
            chunk = _fetch_log(address, job.id, str(entry["log"]), offsets[i], args.timeout, token)
            if chunk:
                got_any = True
                offsets[i] += len(chunk)
                text = chunk.decode(errors="replace")
                if many:
                    tag = f"[{entry.get('node')}/{entry.get('slot')} pid {entry.get('pid', '?')}] "
                    text = "".join(tag + line for line in text.splitlines(keepends=True))
                sys.stdout.write(text)
                sys.stdout.flush()
        if not args.follow:
            return 0
        if not got_any:
            phase = pb.JobPhase.Name(client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id)).status.phase)
            if phase in TERMINAL:
                return 0
            time.sleep(1.0)


def select_logs(entries: list[dict[str, Any]], *, rank: int | None = None, generation: int | None = None,
                node: str | None = None, slot: int | None = None, every: bool = False,
                current: int = 0) -> list[dict[str, Any]]:
    """The worker processes (agents' log index entries) a `tenax logs` asks for, oldest first. Pure.

    ``rank`` (with ``generation``: the process that held it then; without: every process that
    ever held it), ``node``/``slot``, ``every``; with none of them, the processes of the
    current generation ``current``."""
    def ranks(e: dict[str, Any]) -> dict[int, int]:
        raw = e.get("ranks") if isinstance(e.get("ranks"), dict) else {}
        return {int(g): int(r) for g, r in raw.items() if str(g).isdigit() and isinstance(r, int)}

    out = []
    for e in entries:
        held = ranks(e)
        if node is not None and e.get("node") != node:
            continue
        if slot is not None and e.get("slot") != slot:
            continue
        if rank is not None:
            if generation is not None:
                if held.get(generation) != rank:
                    continue
            elif rank not in held.values():
                continue
        elif generation is not None and generation not in held:
            continue
        if rank is None and generation is None and node is None and not every and current not in held:
            continue
        out.append(e)
    return sorted(out, key=lambda e: float(e.get("started", 0) or 0))


def _describe_process(e: dict[str, Any]) -> str:
    held = e.get("ranks") if isinstance(e.get("ranks"), dict) else {}
    ranks = ", ".join(f"rank {r} in generation {g}" for g, r in sorted(held.items(), key=lambda x: int(x[0])))
    end = ""
    if e.get("state") not in (None, "STARTING", "RUNNING"):
        end = f"; {e['state']}" + (f" ({e['signal']})" if e.get("signal") else
                                    f" (exit code {e['exit_code']})" if e.get("exit_code") else "")
        if e.get("cause"):
            end += f": {e['cause']}"
        elif e.get("last_error"):
            end += f": {e['last_error']}"
    return f"{e.get('node')} slot {e.get('slot')} pid {e.get('pid', '?')}: {ranks or 'rank ?'}{end}"


def _agent_get(url: str, timeout_s: float, token: str | None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    return urllib.request.urlopen(request, timeout=timeout_s)


def _fetch_index(address: str, job_id: str, token: str | None, timeout_s: float) -> list[dict[str, Any]] | None:
    """The agent's log index of the job; None from an agent that has none (older), [] if unreachable."""
    url = f"http://{address}/logs/{urllib.parse.quote(job_id)}"
    try:
        with _agent_get(url, timeout_s, token) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise CliError(f"agent at {address} refused the logs: {exc.read().decode(errors='replace').strip()} "
                           "(an API token of role viewer or above: --token-file or $TENAX_TOKEN)") from exc
        return None
    except ValueError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        print(f"tenax: cannot reach agent at {address}: {exc}", file=sys.stderr)
        return []
    return [e for e in data if isinstance(e, dict) and "log" in e] if isinstance(data, list) else None


def _fetch_log(address: str, job_id: str, name: str, offset: int, timeout_s: float, token: str | None) -> bytes:
    url = f"http://{address}/logs/{urllib.parse.quote(job_id)}/{urllib.parse.quote(name)}?offset={offset}"
    try:
        with _agent_get(url, timeout_s, token) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return b""  # no output yet
        raise CliError(f"agent at {address} answered {exc.code} for {url}: "
                       f"{exc.read().decode(errors='replace').strip()}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach agent at {address}: {exc}") from exc


# ------------------------------------------------------------------ registration
def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--controller", help=f"controller host:port[,host:port] (default ${CONTROLLER}, "
                                             "else the local cluster)")
    parent.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per-call deadline, seconds")
    parent.add_argument("--json", action="store_true", help="machine-readable output")
    credentials.add_client_args(parent)  # --ca-file, --cert-file, --key-file, --plaintext, --token-file
    return parent


def register(sub: argparse._SubParsersAction) -> None:
    parent = _client_parent()

    p = sub.add_parser("submit", parents=[parent], help="submit a job file (YAML)")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends; exit 0 iff SUCCEEDED")
    p.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="give up waiting after this, seconds")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", parents=[parent], help="list jobs")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("job", parents=[parent], help="show one job")
    p.add_argument("id")
    p.add_argument("--metrics", action="store_true", help="per-step JSON lines (step, loss, generation, time)")
    p.add_argument("--events", type=int, default=10, metavar="N",
                   help="show the latest N events of the timeline (default 10; `tenax events ID` for all)")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("events", parents=[parent], help="a job's timeline: decisions and changes with their why")
    p.add_argument("id")
    p.add_argument("--limit", type=int, default=200, help="the latest N events (default 200)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events until the job ends")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("nodes", parents=[parent], help="list nodes, or `nodes cordon|uncordon|drain NODE`")
    p.add_argument("action", nargs="?", help="cordon, uncordon or drain")
    p.add_argument("node", nargs="?")
    p.set_defaults(func=cmd_nodes)

    for action in _NODE_ACTIONS:
        p = sub.add_parser(action, parents=[parent], help=f"{action} a node")
        p.add_argument("node")
        p.set_defaults(func=_node_action(action))

    p = sub.add_parser("cancel", parents=[parent], help="cancel a job")
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("logs", parents=[parent], help="print a job's worker logs (from the agents)")
    p.add_argument("id")
    p.add_argument("--rank", type=int, default=None,
                   help="the process(es) that held this rank in any plan generation (or in --generation)")
    p.add_argument("--generation", type=int, default=None, help="with --rank: the rank in this plan generation")
    p.add_argument("--node", default=None, help="the processes that ran on this node (with --slot: that slot)")
    p.add_argument("--slot", type=int, default=None)
    p.add_argument("--all", action="store_true", help="every process the job ever had")
    p.add_argument("--follow", "-f", action="store_true")
    p.set_defaults(func=cmd_logs)
