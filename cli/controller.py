"""`tenax controller`: run one controller replica.

Every setting of the controller process comes from these flags, into one
settings tree (``controller.server.ControllerSettings``: the server, its
security, its health loop and its recovery), validated once; a bad value is
reported with the flag that set it. The controller package itself reads no
flags and no environment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Callable, TypeVar

from common.etcd import EtcdError, EtcdTls, EtcdUnavailable
from controller import auth, limits
from controller.detection import HangSettings, StragglerSettings
from controller.health_loop import HealthSettings
from controller.quarantine import QuarantineSettings
from controller.recovery import RecoverySettings
from controller.rendezvous import RendezvousSettings
from controller.retention import RetentionSettings
from controller.security import SecuritySettings
from controller.server import ControllerSettings, serve
from controller.tls import TlsSettings
from protos.keys import DEFAULT_PREFIX

T = TypeVar("T")

DEFAULT_ETCD = "http://127.0.0.1:2379"

# settings field -> the flag that sets it, per settings class (error messages name the flag)
_SERVER_FLAGS = {"lease_ttl_s": "--lease-ttl", "metrics_port": "--metrics-port", "listen": "--listen",
                 "prefix": "--prefix"}
_HEALTH_FLAGS = {"interval_s": "--health-interval-s"}
_HANG_FLAGS = {"k": "--hang-k", "floor_s": "--hang-floor-s", "startup_timeout_s": "--hang-startup-s"}
_RENDEZVOUS_FLAGS = {"floor_s": "--rendezvous-floor-s", "cap_s": "--rendezvous-cap-s",
                     "startup_factor": "--rendezvous-startup-factor", "step_k": "--rendezvous-step-k"}
_STRAGGLER_FLAGS = {"window_steps": "--straggler-window", "min_window_s": "--straggler-window-s",
                    "z_threshold": "--straggler-z", "min_slowdown": "--straggler-min-slowdown"}
_RECOVERY_FLAGS = {"growth_prepare_s": "--growth-prepare-s", "capacity_wait_s": "--capacity-wait-s"}
_QUARANTINE_FLAGS = {"quarantine.base_cooldown_s": "--quarantine-base-s",
                     "quarantine.max_cooldown_s": "--quarantine-max-s",
                     "quarantine.healthy_reset_s": "--quarantine-reset-s",
                     "quarantine.window_s": "--quarantine-window-s",
                     "quarantine.slot_cordon_failures": "--slot-cordon-failures",
                     "quarantine.node_cordon_failures": "--node-cordon-failures"}
_RETENTION_FLAGS = {"retention.finished_job_retention_s": "--finished-job-retention-s",
                    "retention.unplaceable_fail_after_s": "--unplaceable-fail-after-s"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="run a controller replica",
                       description="Run a Tenax controller replica; it prints one JSON line with its addresses.")
    add_controller_args(p)
    p.set_defaults(func=run_controller)


def add_controller_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--etcd", default=DEFAULT_ETCD, help=f"etcd endpoint (default {DEFAULT_ETCD})")
    parser.add_argument("--listen", default="127.0.0.1:0", help="gRPC listen host:port (port 0 = ephemeral)")
    parser.add_argument("--advertise", default="", help="address clients should use (default: listen address)")
    parser.add_argument("--metrics-port", type=int, default=0, help="/metrics HTTP port (0 = ephemeral, -1 = off)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="/metrics HTTP bind address")
    parser.add_argument("--id", default="", help="replica id (default hostname-pid)")
    parser.add_argument("--lease-ttl", type=int, default=5, help="leader lease TTL, seconds")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"etcd key prefix (default {DEFAULT_PREFIX})")
    _add_security_args(parser)
    _add_health_args(parser)
    _add_retention_args(parser)
    recovery = parser.add_argument_group("recovery")
    recovery.add_argument("--growth-prepare-s", type=float, default=RecoverySettings().growth_prepare_s,
                          help="longest a two-phase growth waits for its new workers to be ready before it is "
                               "abandoned, seconds (default %(default)s)")
    recovery.add_argument("--capacity-wait-s", type=float, default=RecoverySettings().capacity_wait_s,
                          help="longest a job whose failure leaves too few workers for any layout waits for "
                               "workers to come back before it is FAILED, seconds (default %(default)s)")
    recovery.add_argument("--survivors-first", action=argparse.BooleanOptionalAction,
                          default=RecoverySettings().survivors_first,
                          help="a failure's plan runs on the survivors alone when they can, and a two-phase "
                               "growth adds free slots while the job trains (--no-survivors-first: free slots "
                               "join the failure's plan; the survivors wait for the new processes)")
    q = QuarantineSettings()
    recovery.add_argument("--quarantine-base-s", type=float, default=q.base_cooldown_s,
                          help="a slot where a worker failed stays out of the job this long after its first "
                               "failure, doubling per repeated failure, seconds (default %(default)s)")
    recovery.add_argument("--quarantine-max-s", type=float, default=q.max_cooldown_s,
                          help="longest cool-down of a slot, seconds (default %(default)s)")
    recovery.add_argument("--quarantine-reset-s", type=float, default=q.healthy_reset_s,
                          help="a slot with no failure for this long starts again at the base cool-down, "
                               "seconds (default %(default)s)")
    recovery.add_argument("--quarantine-window-s", type=float, default=q.window_s,
                          help="failures older than this do not count towards a cordon, seconds "
                               "(default %(default)s)")
    recovery.add_argument("--slot-cordon-failures", type=int, default=q.slot_cordon_failures,
                          help="failures of one slot within the window that cordon the slot for the job "
                               "(default %(default)s)")
    recovery.add_argument("--node-cordon-failures", type=int, default=q.node_cordon_failures,
                          help="failures on one node within the window that cordon the node "
                               "(default %(default)s)")


def _add_retention_args(parser: argparse.ArgumentParser) -> None:
    defaults = RetentionSettings()
    group = parser.add_argument_group("job retention")
    group.add_argument("--finished-job-retention-s", type=float, default=defaults.finished_job_retention_s,
                       help="delete a finished job (and its metrics and logs index) this many seconds after it "
                            "ended (default %(default)s: 7 days)")
    group.add_argument("--unplaceable-fail-after-s", type=float, default=defaults.unplaceable_fail_after_s,
                       help="fail a PENDING job that needs more workers than the cluster has slots after this "
                            "many seconds (default %(default)s)")


def _add_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--tls", choices=("tls", "mtls", "plaintext"), default=None,
                       help="transport security of the API (default: tls when --tls-cert is given, else refuse "
                            "to start; 'plaintext' must be asked for)")
    group.add_argument("--tls-cert", default="", help="server certificate (PEM)")
    group.add_argument("--tls-key", default="", help="server private key (PEM)")
    group.add_argument("--tls-ca", default="", help="CA bundle that signs client certificates (mtls)")
    group.add_argument("--no-auth", action="store_true",
                       help="let every caller in as admin (development only; logs a warning)")
    group.add_argument("--max-jobs-per-user", type=int, default=limits.Limits().max_active_jobs_per_user)
    group.add_argument("--calls-per-s", type=float, default=limits.Limits().calls_per_s,
                       help="sustained API calls per second per identity")
    group.add_argument("--etcd-ca", default="", help="CA of etcd's certificate (https:// etcd endpoints)")
    group.add_argument("--etcd-cert", default="", help="client certificate for etcd")
    group.add_argument("--etcd-key", default="", help="its private key")


def _add_health_args(parser: argparse.ArgumentParser) -> None:
    hang, straggler, health, rdv = HangSettings(), StragglerSettings(), HealthSettings(), RendezvousSettings()
    group = parser.add_argument_group("health (hang, straggler and degraded-GPU detection, on the leader)")
    group.add_argument("--health-interval-s", type=float, default=health.interval_s,
                       help="seconds between two passes of the health loop (default %(default)s)")
    group.add_argument("--hang-k", type=float, default=hang.k,
                       help="no-progress timeout as a multiple of the median step time, > 1 (default %(default)s)")
    group.add_argument("--hang-floor-s", type=float, default=hang.floor_s,
                       help="shortest no-progress timeout, seconds (default %(default)s)")
    group.add_argument("--hang-startup-s", type=float, default=hang.startup_timeout_s,
                       help="no-progress timeout before a rank's first step of a plan generation, seconds "
                            "(default %(default)s)")
    group.add_argument("--rendezvous-floor-s", type=float, default=rdv.floor_s,
                       help="shortest wait for every rank of a new plan generation to reach its rendezvous, "
                            "seconds (default %(default)s)")
    group.add_argument("--rendezvous-cap-s", type=float, default=rdv.cap_s,
                       help="longest such wait, and the wait while no worker start-up is measured, seconds "
                            "(default %(default)s)")
    group.add_argument("--rendezvous-startup-factor", type=float, default=rdv.startup_factor,
                       help="the wait is this multiple of the job's slowest measured worker start-up, >= 1 "
                            "(default %(default)s) ...")
    group.add_argument("--rendezvous-step-k", type=float, default=rdv.step_k,
                       help="... plus this many median step times (default %(default)s); then the ranks that "
                            "never arrived are re-planned around and their slots quarantined")
    group.add_argument("--straggler-window", type=int, default=straggler.window_steps,
                       help="steps a straggler decision looks at (default %(default)s)")
    group.add_argument("--straggler-window-s", type=float, default=straggler.min_window_s,
                       help="least wall time the decision window must span, seconds (default %(default)s)")
    group.add_argument("--straggler-min-slowdown", type=float, default=straggler.min_slowdown,
                       help="a rank is slow in a step only if its compute time is also at least this fraction "
                            "above the median (0.05 = 5%%; default %(default)s)")
    group.add_argument("--straggler-z", type=float, default=straggler.z_threshold,
                       help="robust z-score above which a rank is slow (default %(default)s)")
    group.add_argument("--drain-degraded", action=argparse.BooleanOptionalAction, default=health.drain_degraded,
                       help="drain nodes whose GPUs report DEGRADED or FAILED (default: on; "
                            "--no-drain-degraded: metrics and logs only)")


def _flags_named(flags: dict[str, str], build: Callable[[], T]) -> T:
    """``build()``, with a ValueError about a settings field ("field: problem") re-worded to name its flag."""
    try:
        return build()
    except ValueError as exc:
        field, sep, problem = str(exc).partition(": ")
        if sep and field in flags:
            raise ValueError(f"{flags[field]}: {problem}") from None
        raise


def health_settings_from_args(args: argparse.Namespace) -> HealthSettings:
    """Raises ValueError naming the flag."""
    hang = _flags_named(_HANG_FLAGS, lambda: HangSettings(
        k=args.hang_k, floor_s=args.hang_floor_s, startup_timeout_s=args.hang_startup_s))
    straggler = _flags_named(_STRAGGLER_FLAGS, lambda: StragglerSettings(
        window_steps=args.straggler_window, z_threshold=args.straggler_z, min_window_s=args.straggler_window_s,
        min_slowdown=args.straggler_min_slowdown))
    rendezvous = _flags_named(_RENDEZVOUS_FLAGS, lambda: RendezvousSettings(
        floor_s=args.rendezvous_floor_s, cap_s=args.rendezvous_cap_s, startup_factor=args.rendezvous_startup_factor,
        step_k=args.rendezvous_step_k))
    return _flags_named(_HEALTH_FLAGS, lambda: HealthSettings(
        interval_s=args.health_interval_s, hang=hang, straggler=straggler, rendezvous=rendezvous,
        drain_degraded=args.drain_degraded))


def security_settings_from_args(args: argparse.Namespace) -> SecuritySettings:
    """Raises ValueError (TlsError) on inconsistent flags."""
    mode = args.tls or ("tls" if args.tls_cert else "")
    if not mode:
        raise ValueError("--tls: give --tls-cert/--tls-key (or run `tenax up`, which makes them), "
                         "or ask for --tls plaintext explicitly")
    lim = limits.Limits(max_active_jobs_per_user=args.max_jobs_per_user, calls_per_s=args.calls_per_s,
                        burst=max(1, int(args.calls_per_s * 2)))
    return SecuritySettings(
        tls=TlsSettings(mode=mode, ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key),
        auth=auth.AuthSettings(enabled=not args.no_auth), limits=lim).validate()


def etcd_tls_from_args(args: argparse.Namespace) -> EtcdTls | None:
    if not getattr(args, "etcd_ca", ""):
        return None
    return EtcdTls(ca_file=args.etcd_ca, cert_file=args.etcd_cert, key_file=args.etcd_key)


def settings_from_args(args: argparse.Namespace) -> ControllerSettings:
    """The whole settings tree of one replica, validated. Raises ValueError naming the flag."""
    settings = ControllerSettings(
        etcd=args.etcd, listen=args.listen, advertise=args.advertise, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, id=args.id, lease_ttl_s=args.lease_ttl, prefix=args.prefix,
        security=security_settings_from_args(args), etcd_tls=etcd_tls_from_args(args),
        health=health_settings_from_args(args),
        recovery=_flags_named(_RECOVERY_FLAGS, lambda: RecoverySettings(
            growth_prepare_s=args.growth_prepare_s, capacity_wait_s=args.capacity_wait_s,
            survivors_first=args.survivors_first, quarantine=quarantine_settings_from_args(args))),
        retention=_flags_named(_RETENTION_FLAGS, lambda: RetentionSettings(
            finished_job_retention_s=args.finished_job_retention_s,
            unplaceable_fail_after_s=args.unplaceable_fail_after_s).validate()))
    _flags_named(_SERVER_FLAGS, settings.validate)
    return settings


def quarantine_settings_from_args(args: argparse.Namespace) -> QuarantineSettings:
    return _flags_named(_QUARANTINE_FLAGS, lambda: QuarantineSettings(
        base_cooldown_s=args.quarantine_base_s, max_cooldown_s=args.quarantine_max_s,
        healthy_reset_s=args.quarantine_reset_s, window_s=args.quarantine_window_s,
        slot_cordon_failures=args.slot_cordon_failures, node_cordon_failures=args.node_cordon_failures))


def controller_tls_args(record: dict) -> list[str]:
    """``tenax controller`` flags that serve TLS with a local cluster's certificate (its ``security``
    record: ``controller.security.bootstrap_local``)."""
    return ["--tls", "tls", "--tls-cert", record["server_cert"], "--tls-key", record["server_key"]]


def run_controller(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"tenax controller: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except (EtcdUnavailable, EtcdError, OSError) as exc:
        print(f"tenax controller: {exc}", file=sys.stderr)
        return 1
    return 0
