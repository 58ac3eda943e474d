"""Running out (issue 9 item 4): a relay's port range full of half-open
sessions, a relay at its descriptor limit. Every request gets a clear answer,
nothing spins, stale half-open sessions age out, and it all works again when
the resources are back."""

import time

import pytest

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call, parse_address_reply
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

PAIRS = 20              # the relay's port range: 10 sessions of one stream (two pairs each)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def offer(proxy, call_id):
    return proxy.update(call_id, "request", "audio:127.0.0.1:9:sendrecv")


def test_a_port_range_full_of_half_open_sessions_answers_error_ages_them_out_and_recovers(cluster):
    cluster.start_dispatcher()
    relay = cluster.start_relay(RELAY_A, pairs=PAIRS, stream_timeout=12)
    with cluster.proxy() as proxy:
        # offers no answer ever follows: the first ones fill the range, the rest get error at once
        placed = [offer(proxy, f"half-open-{n}") for n in range(PAIRS // 2)]
        assert all(parse_address_reply(a)[0] == RELAY_A for a in placed)
        refused = [offer(proxy, f"refused-{n}") for n in range(500)]
        assert refused == ["error"] * 500
        relay_log = relay.log_text()
        assert relay_log.count("no ports for session refused-") == 500          # one line each

        # Nothing spins while full: the relay is idle between requests.
        pid = relay.command_pid
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)
        assert (cpu_seconds(pid) - before) / (time.monotonic() - started) < 0.2

        # The stale half-open sessions age out (stream_timeout) and their ports come back.
        wait_for(lambda: cluster.sessions() == [], timeout=30, interval=0.5,
                 message="the half-open sessions to age out")
        summary = [s for s in cluster.summary() if s["ip"] == RELAY_A][0]
        assert summary["port_pairs"] == {"used": 0, "free": PAIRS, "set_aside": 0}
        call = Call(proxy, "after-the-flood")
        try:
            call.exchange()
        finally:
            call.close()
    cluster.assert_alive()


def test_a_relay_at_its_descriptor_limit_answers_error_keeps_its_link_and_recovers(cluster):
    cluster.start_dispatcher()
    # About 25 descriptors for media once the relay has started: a handful of sessions at most.
    relay = cluster.start_relay(RELAY_A, wrapper=("prlimit", "--nofile=48:48"))
    with cluster.proxy() as proxy:
        answers = [offer(proxy, f"fd-{n}") for n in range(40)]
        placed = [n for n, a in enumerate(answers) if a != "error"]
        assert 0 < len(placed) < 40 and answers.count("error") == 40 - len(placed)
        relay.wait_for_log(r"no ports for session fd-\d+: cannot open sockets: Too many open files", timeout=5)
        assert "set aside" not in relay.log_text()          # the ports are fine: none is given up
        assert "lost dispatcher" not in relay.log_text()    # the link to the dispatcher stayed up
        # Descriptors come back as sessions end: new calls work again.
        for n in placed:
            assert proxy.remove(f"fd-{n}", to_tag="") == "removed"
        call = Call(proxy, "after-the-limit")
        try:
            call.exchange()
        finally:
            call.close()
    summary = [s for s in cluster.summary() if s["ip"] == RELAY_A][0]
    assert summary["status"] == "active" and summary["port_pairs"]["set_aside"] == 0
    cluster.assert_alive()
