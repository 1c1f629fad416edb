"""A local run listens on loopback only: task names carry slide file names (often patient identifiers),
and the dashboard shows them along with worker logs and call stacks to anyone who can connect."""

from __future__ import annotations

import ipaddress
import os

import psutil

from wsi_grunet.cluster import open_client
from wsi_grunet.config import load_config


def _listening_sockets(process: psutil.Process) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets ``process`` listens on."""
    # psutil before 6.0 only has the older name of the same call
    connections = (
        process.net_connections(kind="inet")
        if hasattr(process, "net_connections")
        else process.connections(kind="inet")
    )
    return [(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]


def listening_sockets_of_this_run() -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening socket of this process and the worker processes it started."""
    this = psutil.Process()
    found = []
    for process in [this, *this.children(recursive=True)]:
        try:
            found += [(process.pid, ip, port) for ip, port in _listening_sockets(process)]
        except psutil.NoSuchProcess:  # a helper process that exited while being looked at
            continue
    return found


def test_a_local_run_listens_on_loopback_only():
    cfg = load_config(None, [{"cluster": {"kind": "local", "scheduler": None, "workers": 1}}])
    with open_client(cfg) as client:
        sockets = listening_sockets_of_this_run()
        dashboard = client.dashboard_link
    # Both sides must have been seen, or the loopback check below would pass for want of sockets.
    assert any(pid == os.getpid() for pid, _, _ in sockets), f"no socket of the scheduler's process: {sockets}"
    assert any(pid != os.getpid() for pid, _, _ in sockets), f"no socket of a worker process: {sockets}"
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert exposed == [], f"listening beyond this machine (pid, address, port): {exposed}"
    assert dashboard.startswith("http://127.0.0.1:"), dashboard
