"""A real call through Kamailio and MediaProxy.

proxy (198.18.0.2): media-dispatcher, then Kamailio with engage_media_proxy();
relay1 (198.18.0.5): media-relay; caller (.10) and callee (.20): sipp.
The caller calls the callee, both send G.711 A-law for a few seconds, the
caller hangs up. What a user sees: each side is told to send its media to
the relay, gets the other side's media from the relay, the dispatcher's
management interface shows the call while it runs and forgets it after BYE.
"""

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
from tests.support.certs import make_certs_dir
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60), pytest.mark.usefixtures("e2e_tools")]

CALL_MS = 4000
PORT_RANGE = (50000, 50100)
COUNTERS = ("caller_bytes", "callee_bytes", "caller_packets", "callee_packets")


def test_call_through_mediaproxy(make_topology, tmp_path):
    topo = make_topology(["proxy", "relay1", "caller", "callee"])
    relay, caller, callee = topo.address("relay1"), topo.address("caller"), topo.address("callee")
    certs = make_certs_dir(tmp_path / "tls", dispatcher_san_ips=(topo.address("proxy"),), relay_san_ips=(relay,))

    dispatcher = start_dispatcher(topo, tmp_path, certs.path)
    start_relay(topo, tmp_path, certs.path, port_range=PORT_RANGE)
    start_kamailio(topo, tmp_path, dispatcher_socket=dispatcher_socket(dispatcher))
    management = Management(topo)
    assert management.sessions() == []

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
    to_callee = rtp_sources(at_callee.stop(), f"{callee}:{MEDIA_PORT}")
    to_caller = rtp_sources(at_caller.stop(), f"{caller}:{MEDIA_PORT}")
    assert set(to_callee) == {(f"{relay}:{offer.port}", 8)}, to_callee
    assert set(to_caller) == {(f"{relay}:{answer.port}", 8)}, to_caller
    assert to_callee[(f"{relay}:{offer.port}", 8)] >= expected
    assert to_caller[(f"{relay}:{answer.port}", 8)] >= expected
