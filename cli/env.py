"""Environment variables the `tenax` command reads: user conveniences, like KUBECONFIG for kubectl.

Each is the default of a flag of the client commands (the flag wins). Every other
setting of every service comes from flags; the workers' launch contract (variables
an agent sets for the processes it starts) is defined with the worker, not here.
"""

from __future__ import annotations

import os
from pathlib import Path

CONTROLLER = "TENAX_CONTROLLER"
"""Controller address(es), ``host:port[,host:port]``: the default of ``--controller``."""
HOME = "TENAX_HOME"
"""Tenax's per-user directory (local cluster state, agent work dirs); default ``~/.tenax``."""


def tenax_home() -> Path:
    """``$TENAX_HOME``, else ``~/.tenax``."""
    home = os.environ.get(HOME)
    return Path(home) if home else Path.home() / ".tenax"


def controller_from_env() -> str:
    """``$TENAX_CONTROLLER`` (empty when unset)."""
    return os.environ.get(CONTROLLER, "")
