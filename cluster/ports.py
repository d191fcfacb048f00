"""Ports for the servers a test or benchmark starts on this machine."""

import socket


def free_port() -> int:
    """A TCP port nobody listens on now, on loopback (for servers a benchmark or test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
