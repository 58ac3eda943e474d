"""The dispatcher's UNIX sockets: the proxy's (requests) and its own RPC
socket (the proxy's management interface answers there) are mode 0660,
never world-writable; [Dispatcher] socket_group gives both to the group the
proxy runs as."""

import grp
import os
import stat

import pytest

pytestmark = pytest.mark.integration

GROUP = "nogroup"  # on every Debian system, and not root's group


def mode_and_group(path):
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode), path
    return stat.S_IMODE(info.st_mode), info.st_gid


def test_the_sockets_are_not_world_writable(cluster):
    cluster.start_dispatcher()
    rpc_socket = cluster.socket_path.parent / "dispatcher-rpc.sock"
    for path in (cluster.socket_path, rpc_socket):
        assert mode_and_group(path) == (0o660, os.getegid())
    with cluster.proxy() as proxy:       # and the proxy can still talk to it
        assert proxy.remove("no-such-call") == "error"


def test_socket_group_gives_the_sockets_to_the_proxys_group(cluster):
    gid = grp.getgrnam(GROUP).gr_gid
    cluster.start_dispatcher(socket_group=GROUP)
    for path in (cluster.socket_path, cluster.socket_path.parent / "dispatcher-rpc.sock"):
        assert mode_and_group(path) == (0o660, gid)


def test_an_unknown_socket_group_stops_the_start(cluster):
    process = cluster.start_dispatcher(socket_group="no-such-group-here", wait=False)
    assert process.wait(timeout=15) == 1
    assert "cannot start: [Dispatcher] socket_group: there is no group 'no-such-group-here'" in process.log_text()
