"""A real call through Kamailio and MediaProxy.

proxy (198.18.0.2): media-dispatcher, then Kamailio with engage_media_proxy();
relay1 (198.18.0.5): media-relay; caller (.10) and callee (.20): sipp.
The caller calls the callee, both send G.711 A-law for a few seconds, the
caller hangs up. What a user sees: each side is told to send its media to
the relay, gets the other side's media from the relay, the dispatcher's
management interface shows the call while it runs and forgets it after BYE.

The relay runs with its kernel path (issue 4): once both sides are latched
the call's RTP is carried by a conntrack NAT entry with the relay's mark,
the relay process forwards nothing more, and the statistics the dispatcher
gets when the call ends still have the codec and the kernel's counters.
"""

import json
import time

import pytest

from tests.e2e.helpers import (
    MEDIA_PORT,
    Capture,
    Management,
    dispatcher_socket,
    rtp_sources,
    sip_header,
    start_dispatcher,
    start_kamailio,
    start_relay,
    start_uac,
    start_uas,
)
from tests.kernel.helpers import MARK, RECORDING_DISPATCHER, Flow, conntrack_entries
from tests.support.certs import make_certs_dir
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60), pytest.mark.usefixtures("e2e_tools")]

CALL_MS = 6000  # the pcap sipp plays holds 7 s of media
PORT_RANGE = (50000, 50100)
COUNTERS = ("caller_bytes", "callee_bytes", "caller_packets", "callee_packets")
RTP_PAYLOAD = 252  # every packet of sipp's g711a.pcap: 12 bytes of RTP header, 240 of A-law (30 ms)


def address(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


def packets_between(packets, source: str, destination: str) -> int:
    return sum(1 for packet in packets if packet.source == source and packet.destination == destination)


def test_call_through_mediaproxy(make_topology, tmp_path):
    topo = make_topology(["proxy", "relay1", "caller", "callee"])
    relay, caller, callee = topo.address("relay1"), topo.address("caller"), topo.address("callee")
    certs = make_certs_dir(tmp_path / "tls", dispatcher_san_ips=(topo.address("proxy"),), relay_san_ips=(relay,))

    # The dispatcher appends the statistics of every call that ends to a file (tests/kernel/recording_dispatcher.py).
    accounting = tmp_path / "accounting.jsonl"
    dispatcher = start_dispatcher(
        topo, tmp_path, certs.path, script=RECORDING_DISPATCHER, arguments=("--accounting-file", str(accounting))
    )
    start_relay(topo, tmp_path, certs.path, port_range=PORT_RANGE)
    start_kamailio(topo, tmp_path, dispatcher_socket=dispatcher_socket(dispatcher))
    management = Management(topo)
    assert management.sessions() == []
    [summary] = management.summary()
    assert summary["forwarding"] == "kernel", summary

    at_caller = Capture(topo, "caller", tmp_path / "caller.pcap")
    at_callee = Capture(topo, "callee", tmp_path / "callee.pcap")
    uas = start_uas(topo, tmp_path / "sipp")
    uac = start_uac(topo, tmp_path / "sipp", duration_ms=CALL_MS)

    # While the call runs, the dispatcher shows it with its codec and traffic both ways.
    def running_session():
        uac.process.assert_running()
        for session in management.sessions():
            streams = session.get("streams") or []
            if (
                len(streams) == 1
                and streams[0]["caller_codec"] == streams[0]["callee_codec"] == "G711a"
                and all(streams[0][counter] > 0 for counter in COUNTERS)
            ):
                return session
        return None

    session = wait_for(running_session, timeout=CALL_MS / 1000, interval=0.2, message="the call in `sessions`")
    stream = session["streams"][0]
    assert stream["media_type"] == "audio"
    assert stream["status"] == "active"

    # The kernel carries the call: the relay reports an entry, conntrack shows it with the relay's mark,
    # the call's counters go on rising while the relay process forwards nothing.
    def in_the_kernel():
        uac.process.assert_running()
        [summary] = management.summary()
        return summary["kernel_entries"] >= 1 and summary
    summary = wait_for(in_the_kernel, timeout=2, interval=0.1, message="the relay to hand the call to the kernel")
    [entry] = conntrack_entries(topo, "relay1")
    caller_local, callee_local = address(stream["caller_local"]), address(stream["callee_local"])
    assert entry.orig == Flow(caller, relay, MEDIA_PORT, caller_local[1]), entry.line
    assert entry.reply == Flow(callee, relay, MEDIA_PORT, callee_local[1]), entry.line
    assert entry.mark == MARK
    packets_before = sum(session["streams"][0][f"{party}_packets"] for party in ("caller", "callee"))
    time.sleep(1.0)  # a second of the running call
    [later] = management.summary()
    session = next(s for s in management.sessions() if s["call_id"] == session["call_id"])
    uac.process.assert_running()
    assert later["userspace_packets"] == summary["userspace_packets"], (summary, later)
    packets_after = sum(session["streams"][0][f"{party}_packets"] for party in ("caller", "callee"))
    assert packets_after - packets_before >= 2 * 20, (packets_before, packets_after)  # 33 packets/s each way

    assert uac.wait(timeout=20) == 0, uac.error_log()
    assert uas.wait(timeout=10) == 0, uas.error_log()

    # The proxy told each side to send its media to the relay, on ports of its range.
    offer = uas.received_sdp().audio()  # what the callee was offered
    answer = uac.received_sdp().audio()  # what the caller got as the answer
    for media in (offer, answer):
        assert media.connection == relay
        assert PORT_RANGE[0] <= media.port < PORT_RANGE[1]
        assert media.formats[:1] == ("8",)
    assert offer.port != answer.port

    # The session is the call the callee received.
    assert session["call_id"] == sip_header(uas.received()[0], "Call-ID")

    # After the BYE the dispatcher has forgotten the call.
    wait_for(lambda: management.sessions() == [], timeout=5, interval=0.1, message="`sessions` to be empty after BYE")

    # Each side's media came from the relay (from the port it sends to: symmetric RTP), none directly.
    expected = CALL_MS // 30 // 2  # 30 ms packets, for at least half of the call
    callee_packets, caller_packets = at_callee.stop(), at_caller.stop()
    to_callee = rtp_sources(callee_packets, f"{callee}:{MEDIA_PORT}")
    to_caller = rtp_sources(caller_packets, f"{caller}:{MEDIA_PORT}")
    assert set(to_callee) == {(f"{relay}:{offer.port}", 8)}, to_callee
    assert set(to_caller) == {(f"{relay}:{answer.port}", 8)}, to_caller
    assert to_callee[(f"{relay}:{offer.port}", 8)] >= expected
    assert to_caller[(f"{relay}:{answer.port}", 8)] >= expected

    # The statistics the dispatcher got at the end: the codec, and counters that add up. The relay
    # counted what reached it (at most what a side sent, at least what it relayed to the other side),
    # in UDP payload bytes, through user space and the kernel.
    wait_for(accounting.exists, timeout=5, interval=0.1, message="the call's statistics to be accounted")
    [record] = [json.loads(line) for line in accounting.read_text().splitlines()]
    assert record["call_id"] == session["call_id"]
    [final] = record["streams"]
    assert (final["caller_codec"], final["callee_codec"], final["status"]) == ("G711a", "G711a", "closed")
    sent_by_caller = packets_between(caller_packets, f"{caller}:{MEDIA_PORT}", f"{relay}:{answer.port}")
    sent_by_callee = packets_between(callee_packets, f"{callee}:{MEDIA_PORT}", f"{relay}:{offer.port}")
    assert to_callee[(f"{relay}:{offer.port}", 8)] <= final["caller_packets"] <= sent_by_caller, final
    assert to_caller[(f"{relay}:{answer.port}", 8)] <= final["callee_packets"] <= sent_by_callee, final
    assert final["caller_bytes"] == RTP_PAYLOAD * final["caller_packets"]
    assert final["callee_bytes"] == RTP_PAYLOAD * final["callee_packets"]
