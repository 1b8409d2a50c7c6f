"""The agent's rendezvous store: a torch TCPStore server.

Workers connect as clients and use ``PrefixStore(plan.store_prefix, client)``,
so each plan generation has its own key space. torch is imported only here,
lazily, so ``tenax agent --help`` stays fast.

The store has no authentication of its own, so it listens only on the address the
agent advertises it at (loopback under ``tenax up``), never on every interface: torch's
TCPStore server binds the wildcard address unless it is handed a listening socket
(``master_listen_fd``), so this module binds that socket itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
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

        listener = listening_socket(bind_host, port)
        bound_port = listener.getsockname()[1]
        fd = listener.detach()  # the store owns the descriptor from here on and closes it when it stops
        try:
            self._store = dist.TCPStore(bind_host, bound_port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        self.port = int(self._store.port)
        log.info("rendezvous store listening on %s:%d", bind_host, self.port)
        return self.port

    def stop(self) -> None:
        self._store = None  # the server stops (and closes its socket) when the last reference goes


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host`` (an address or a name resolving to one) and ``port``
    (0: ephemeral). Raises OSError naming the address."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"rendezvous store: {host!r} resolves to no address")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise OSError(f"rendezvous store cannot listen on {host}:{port}: {exc}") from exc
    return sock
