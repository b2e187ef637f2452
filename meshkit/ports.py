"""One port, one process: a port another process listens on is refused, by name, at start."""
from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """Another process listens on a port this one must open."""

    def __init__(self, what: str, address: str):
        super().__init__(f"{what}: {address} is in use by another process (one port, one process: "
                         "is another mesh running?)")
        self.address = address


def port_in_use(address: str) -> bool:
    """Whether a process listens on ``address`` (host:port). The test bind is made as gRPC's is, with
    SO_REUSEADDR, so a port held only by connections in TIME_WAIT counts as free."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False
