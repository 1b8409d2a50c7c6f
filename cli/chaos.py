"""`tenax chaos`: fault injection for game days and tests (admin only).

    tenax chaos kill      --job ID --rank R          SIGKILL the rank's worker
    tenax chaos hang      --job ID --rank R          SIGSTOP it (the hang detector must catch it)
    tenax chaos slow      --job ID --rank R [--factor 1.5]   stretch its compute (a straggler)
    tenax chaos kill-node NODE                       the agent kills its workers and crashes

The request goes through the controller (``ChaosService.Inject``), which finds
the node running the rank and leaves the request for that node's agent in etcd.
"""

from __future__ import annotations

import argparse
import json

from cli.client import Client, CliError, _client_parent, _command, controller_addresses
from protos import tenax_pb2 as pb


def inject(client: Client, request: pb.ChaosRequest) -> pb.ChaosResponse:
    """Inject on the first controller replica that answers (any replica accepts it)."""
    return client.call("chaos", "Inject", request)


def request_from_args(args: argparse.Namespace) -> pb.ChaosRequest:
    if args.action == "kill-node":
        if not args.node:
            raise CliError("chaos kill-node needs a NODE")
        return pb.ChaosRequest(action="kill-node", node_id=args.node)
    if args.node:
        raise CliError(f"chaos {args.action} takes --job and --rank, not a node")
    if not args.job or args.rank is None:
        raise CliError(f"chaos {args.action} needs --job ID and --rank R")
    if args.action == "slow" and not 1.0 <= args.factor <= 100.0:
        raise CliError(f"--factor must be in [1, 100], got {args.factor}")
    return pb.ChaosRequest(action=args.action, job_id=args.job, rank=args.rank,
                           factor=args.factor if args.action == "slow" else 0.0)


@_command
def cmd_chaos(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    reply = inject(Client(controller_addresses(args), args.timeout, args), request)
    if args.json:
        print(json.dumps({"id": reply.id, "node": reply.node_id, "message": reply.message}))
    else:
        print(reply.message)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", parents=[_client_parent()], help="inject a fault (admin): kill|hang|slow|kill-node",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("kill", "hang", "slow", "kill-node"))
    p.add_argument("node", nargs="?", default="", help="kill-node: the node id")
    p.add_argument("--job", default="", help="job id (kill, hang, slow)")
    p.add_argument("--rank", type=int, default=None, help="global rank in the job's current plan")
    p.add_argument("--factor", type=float, default=1.5, help="slow: compute time multiplier (default 1.5)")
    p.set_defaults(func=cmd_chaos)
