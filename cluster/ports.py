"""This machine's addresses and ports: which hosts are loopback, and free ports for the servers a test or
benchmark starts."""

import ipaddress
import socket


def free_port() -> int:
    """A TCP port nobody listens on now, on loopback (for servers a benchmark or test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` (an IP address or "localhost") is this machine's loopback; False for anything else."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket reports IPv4 peers
    return (mapped or address).is_loopback
