"""The end-to-end harness on its own, without MediaProxy.

Kamailio (without the mediaproxy module) proxies a sipp call from the caller
to the callee; media flows directly between them. If this fails, the
environment or the harness is broken, not MediaProxy.
"""

from collections import Counter

import pytest

from tests.e2e.helpers import MEDIA_PORT, Capture, start_kamailio, start_uac, start_uas
from tests.support.pcap import parse_rtp

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("e2e_tools")]

CALL_MS = 3000


def rtp_flows(packets, destination):
    """(source, payload type) → packet count of the RTP arriving at ``destination``."""
    flows = Counter()
    for packet in packets:
        rtp = parse_rtp(packet.payload)
        if packet.destination == destination and rtp is not None:
            flows[(packet.source, rtp.payload_type)] += 1
    return flows


def test_direct_call_through_kamailio(make_topology, tmp_path):
    topo = make_topology(["proxy", "caller", "callee"])
    caller, callee = topo.address("caller"), topo.address("callee")
    topo.ping("caller", "proxy")
    topo.ping("proxy", "callee")

    start_kamailio(topo, tmp_path)
    capture_callee = Capture(topo, "callee", tmp_path / "callee.pcap")
    capture_caller = Capture(topo, "caller", tmp_path / "caller.pcap")
    uas = start_uas(topo, tmp_path / "sipp")
    uac = start_uac(topo, tmp_path / "sipp", duration_ms=CALL_MS)

    uac.wait(timeout=20)
    uas.wait(timeout=5)
    uac.assert_succeeded()
    uas.assert_succeeded()
    at_callee = capture_callee.stop()
    at_caller = capture_caller.stop()

    # Without a media relay each side gets the other's SDP unchanged...
    offer = uas.received_sdp().audio()
    answer = uac.received_sdp().audio()
    assert (offer.connection, offer.port) == (caller, MEDIA_PORT)
    assert (answer.connection, answer.port) == (callee, MEDIA_PORT)
    assert offer.rtpmap()[8] == "PCMA/8000"

    # ...and each side's G.711 A-law reaches the other directly, for most of the call.
    expected = CALL_MS // 30 // 2  # packets of 30 ms, allowing for slow starts
    to_callee = rtp_flows(at_callee, f"{callee}:{MEDIA_PORT}")
    to_caller = rtp_flows(at_caller, f"{caller}:{MEDIA_PORT}")
    assert set(to_callee) == {(f"{caller}:{MEDIA_PORT}", 8)}, to_callee
    assert set(to_caller) == {(f"{callee}:{MEDIA_PORT}", 8)}, to_caller
    assert to_callee[(f"{caller}:{MEDIA_PORT}", 8)] >= expected
    assert to_caller[(f"{callee}:{MEDIA_PORT}", 8)] >= expected

    # The signalling went through the proxy with a recorded route.
    invite = uas.received()[0]
    assert invite.startswith(f"INVITE sip:service@{callee}:5060 SIP/2.0")
    assert f"Record-Route: <sip:{topo.address('proxy')};lr" in invite
