"""What the controller's loops and services may touch: the narrow handle.

The controller process (controller/server.py) owns the etcd client, the key
layout, the watched mirror, the wake-up of the leader's reconcile pass and the
leader election. The loops (job reconcile, recovery, health, chaos) and the API
services get this handle instead of the whole controller, so none of them
imports the server module, and each can be built in a test from real or fake
parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from common.etcd import Etcd
from controller.state import ClusterCache
from protos.keys import Keys


@dataclass(frozen=True, kw_only=True)
class ControllerHandle:
    etcd: Etcd
    """The controller's etcd client (every call has a timeout)."""
    keys: Keys
    """The cluster's key layout (its etcd prefix)."""
    cache: ClusterCache
    """The watched mirror of the cluster's keys (read by every replica)."""
    wake: Callable[[], None]
    """Ask the leader's reconcile pass to run now instead of after its interval."""
    is_leader: Callable[[], bool]
    """True while this replica holds the leader lease (decisions are taken only then)."""
