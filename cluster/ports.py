"""This machine's addresses and ports: which hosts are loopback, and free ports for the servers a test or
benchmark starts."""

import ipaddress
import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to bind(0) and outgoing connections (Linux's ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port nobody listens on now, for servers a benchmark or test starts.

    Not one the kernel would give bind(0) or an outgoing connection (as Ray's raylets, agents and their clients
    take between our pick and our server's bind: "Failed to bind to address 127.0.0.1:44217" in CI), nor Ray's
    worker ports (10002-19999): a random free one from 20000 to the ephemeral range's start, each once a process.
    """
    low, high = 20000, max(_ephemeral_low(), 20000 + 1024)
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high}")


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
