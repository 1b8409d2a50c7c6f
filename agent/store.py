"""The agent's rendezvous store: a torch TCPStore server.

Workers connect as clients and use ``PrefixStore(plan.store_prefix, client)``,
so each plan generation has its own key space. torch is imported only here,
lazily, so ``tenax agent --help`` stays fast.
"""

from __future__ import annotations

import datetime
import logging
import warnings

log = logging.getLogger(__name__)


class RendezvousStore:
    def __init__(self) -> None:
        self._store = None
        self.port = 0

    def start(self, bind_host: str, port: int = 0, timeout_s: float = 30.0) -> int:
        """Start the server (blocking: run it in a thread); returns the bound port."""
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless
        import torch.distributed as dist  # lazy: torch takes seconds to import; `tenax --help` must not wait

        self._store = dist.TCPStore(bind_host, port, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self.port = int(self._store.port)
        log.info("rendezvous store listening on port %d", self.port)
        return self.port

    def stop(self) -> None:
        self._store = None  # the server stops when the last reference goes
