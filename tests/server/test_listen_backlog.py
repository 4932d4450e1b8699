"""The HTTP listener queues bursts of connections: its backlog is raised well above the 5 that
Debian's cpp-httplib uses, which reset clients when many connected during a long engine step.
`ss` (iproute2) shows a listening socket's backlog in its Send-Q column."""
import shutil
import subprocess

import pytest


def test_listen_backlog_is_raised(server):
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) is not installed")
    port = server.url.rsplit(":", 1)[1]
    out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.split()
    assert out, f"no listening socket on port {port}"
    # State Recv-Q Send-Q Local Peer: for a listener Send-Q is the backlog.
    assert int(out[2]) >= 128, out
