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
    }


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
            print(json.dumps({"step": s.step, "loss": s.loss, "generation": s.generation, "time": s.time,
                              "step_time_s": s.step_time_s, "tokens_per_s": s.tokens_per_s}))
        return 0
    job = client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id))
    r = job_record(job)
    if args.json:
        _print_json(r)
        return 0
    lay = r["layout"]
    print(f"job        {r['id']}\nphase      {r['phase']} ({r['message']})\n"
          f"step       {r['step']}/{r['steps']}  loss {r['loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  "
          f"ETA {_fmt_duration(r['eta_s'])}\n"
          f"generation {r['generation']}  layout dp={lay['dp']} pp={lay['pp']} zero={lay['zero_stage']}")
    print(f"{'RANK':>4} {'NODE':<24} {'SLOT':>4} {'PID':>8} STATE")
    for w in r["workers"]:
        print(f"{w['rank']:>4} {w['node']:<24} {w['slot']:>4} {w['pid']:>8} {w['state']}")
    for rec in r["recoveries"]:
        print(f"recovery: {json.dumps(rec, sort_keys=True)}")
    return 0


def _print_nodes(nodes: list[pb.NodeInfo], as_json: bool) -> None:
    records = [node_record(n) for n in nodes]
    if as_json:
        _print_json(records)
        return
    print(f"{'NODE':<24} {'STATE':<10} {'SLOTS':>5} {'USED':>4} {'CONDITION':<10} REASON")
    for r in records:
        print(f"{r['id']:<24} {r['state']:<10} {r['slots']:>5} {r['used_slots']:>4} {r['condition']:<10} "
              f"{r['condition_reason']}")


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
    """Logs live on the agents: GET http://<NodeInfo.address>/logs/<job>/<rank>?offset=N."""
    client = _client(args)
    job = client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id))
    nodes = {n.id: n for n in client.call("node", "ListNodes", pb.ListNodesRequest()).nodes}
    workers = [w for w in job.status.workers if args.rank is None or w.rank == args.rank]
    if not workers:
        raise CliError(f"job {args.id} has no worker" + (f" with rank {args.rank}" if args.rank is not None else "")
                       + " (not scheduled yet?)")
    offsets = {w.rank: 0 for w in workers}
    prefix = len(workers) > 1
    while True:
        got_any = False
        for w in workers:
            node = nodes.get(w.node)
            if node is None or not node.address:
                raise CliError(f"node {w.node} of rank {w.rank} is unknown or has no address")
            chunk = _fetch_log(node.address, job.id, w.rank, offsets[w.rank], args.timeout)
            if chunk:
                got_any = True
                offsets[w.rank] += len(chunk)
                text = chunk.decode(errors="replace")
                if prefix:
                    text = "".join(f"[rank {w.rank}] {line}" for line in text.splitlines(keepends=True))
                sys.stdout.write(text)
                sys.stdout.flush()
        if not args.follow:
            return 0
        if not got_any:
            phase = pb.JobPhase.Name(client.call("job", "GetJob", pb.GetJobRequest(job_id=args.id)).status.phase)
            if phase in TERMINAL:
                return 0
            time.sleep(1.0)


def _fetch_log(address: str, job_id: str, rank: int, offset: int, timeout_s: float) -> bytes:
    url = f"http://{address}/logs/{urllib.parse.quote(job_id)}/{rank}?offset={offset}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return b""  # no output yet
        raise CliError(f"agent at {address} answered {exc.code} for {url}") from exc
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
    p.set_defaults(func=cmd_job)

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
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--follow", "-f", action="store_true")
    p.set_defaults(func=cmd_logs)
