"""The end-to-end harness on its own, without MediaProxy.

Kamailio (without the mediaproxy module) proxies a sipp call from the caller
to the callee; media flows directly between them. If this fails, the
environment or the harness is broken, not MediaProxy.
"""

import subprocess

import pytest

from tests.e2e.helpers import (
    MEDIA_PORT,
    Capture,
    kamailio_rpc,
    kamailio_rundir,
    render_kamailio_cfg,
    rtp_sources,
    sip_header,
    start_kamailio,
    start_uac,
    start_uas,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60), pytest.mark.usefixtures("e2e_tools")]

CALL_MS = 3000


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

    # The dialog module tracks the call and answers over the JSON-RPC datagram socket.
    def confirmed_dialogs():
        uac.process.assert_running()
        return [dialog for dialog in kamailio_rpc(kamailio_rundir(tmp_path), "dlg.list") or [] if dialog["state"] == 4]

    dialogs = wait_for(confirmed_dialogs, timeout=CALL_MS / 1000, interval=0.1, message="a confirmed dialog")

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
    to_callee = rtp_sources(at_callee, f"{callee}:{MEDIA_PORT}")
    to_caller = rtp_sources(at_caller, f"{caller}:{MEDIA_PORT}")
    assert set(to_callee) == {(f"{caller}:{MEDIA_PORT}", 8)}, to_callee
    assert set(to_caller) == {(f"{callee}:{MEDIA_PORT}", 8)}, to_caller
    assert to_callee[(f"{caller}:{MEDIA_PORT}", 8)] >= expected
    assert to_caller[(f"{callee}:{MEDIA_PORT}", 8)] >= expected

    # The signalling went through the proxy with a recorded route.
    invite = uas.received()[0]
    assert invite.startswith(f"INVITE sip:service@{callee}:5060 SIP/2.0")
    assert f"Record-Route: <sip:{topo.address('proxy')};lr" in invite
    assert [dialog["call-id"] for dialog in dialogs] == [sip_header(invite, "Call-ID")]


@pytest.mark.parametrize("mediaproxy", [False, True], ids=["plain", "mediaproxy"])
def test_kamailio_config_is_valid(tmp_path, mediaproxy):
    config = render_kamailio_cfg(
        tmp_path / "kamailio.cfg", "127.0.0.1", tmp_path, tmp_path / "dispatcher.sock" if mediaproxy else None
    )
    result = subprocess.run(
        ["kamailio", "-c", "-f", config, "-Y", tmp_path], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
