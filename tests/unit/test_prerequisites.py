"""The relay's start-up checks of the host name what is missing, all at once."""

import os

import pytest

from mediaproxy.relay.kernel.prerequisites import (check_ip_forward, check_kernel, check_privileges,
                                                   effective_capabilities, missing_prerequisites)

ROOT_STATUS = "Name:\tmedia-relay\nCapEff:\t000001ffffffffff\n"
NET_ADMIN_ONLY = "CapEff:\t%016x\n" % (1 << 12)
NO_CAPABILITIES = "CapEff:\t0000000000000000\n"


def uname(sysname="Linux", release="6.1.0-13-amd64"):
    return lambda: os.uname_result((sysname, "relay", release, "#1 SMP", "x86_64"))


def reader(files):
    return lambda path: files.get(path)


def ok_iptables():
    return None


def test_a_good_host_lacks_nothing():
    files = {"/proc/self/status": ROOT_STATUS, "/proc/sys/net/ipv4/ip_forward": "1\n"}
    assert missing_prerequisites(uname(), reader(files), ok_iptables) == []


def test_every_problem_is_named_at_once():
    def no_libraries():
        raise OSError("libxtables.so.12: cannot open shared object file")

    files = {"/proc/self/status": NO_CAPABILITIES, "/proc/sys/net/ipv4/ip_forward": "0\n"}
    problems = missing_prerequisites(uname(), reader(files), no_libraries)
    assert problems == [
        "the kernel path needs CAP_NET_ADMIN and CAP_NET_RAW (run media-relay as root, or as its systemd unit does)",
        "the iptables libraries cannot be loaded (install iptables and python3-iptables): "
        "libxtables.so.12: cannot open shared object file",
        "net.ipv4.ip_forward is 0, the kernel must forward the relayed packets (sysctl -w net.ipv4.ip_forward=1)",
    ]


def test_the_kernel_comes_first_and_alone():
    assert missing_prerequisites(uname("FreeBSD", "14.0"), reader({}), ok_iptables) == [
        "the kernel path needs Linux (this is FreeBSD)"]
    assert check_kernel("Linux", "4.9.0-8-amd64") == "the kernel path needs Linux 4.19 or newer (this is 4.9.0-8-amd64)"
    assert check_kernel("Linux", "4.19.0-27-amd64") is None
    assert check_kernel("Linux", "6.18.44-fc") is None
    assert check_kernel("Linux", "weird") is not None


def test_privileges_need_both_capabilities():
    assert check_privileges(ROOT_STATUS) is None
    assert "CAP_NET_RAW" in check_privileges(NET_ADMIN_ONLY)
    assert "CAP_NET_ADMIN" not in check_privileges(NET_ADMIN_ONLY)
    assert effective_capabilities(None) == 0
    assert check_privileges(None) is not None


def test_ip_forward_unreadable_or_off():
    assert check_ip_forward("1\n") is None
    assert "cannot be read" in check_ip_forward(None)
    assert check_ip_forward("0").startswith("net.ipv4.ip_forward is 0")


def test_this_process_as_root_has_the_privileges():
    if os.geteuid() != 0:
        pytest.skip("not root")
    with open("/proc/self/status") as f:
        assert check_privileges(f.read()) is None
