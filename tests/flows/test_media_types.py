"""Calls with more than audio: audio + video in one call, and audio switched
to T.38 fax by re-INVITE.

sipp streams the audio; the other stream (H.264 video on port 6010, UDPTL on
port 6020 of each side) is sent and received by the test itself from sockets
in the caller's and the callee's namespaces, to the relay ports the SDP each
side got names. What a user sees: each stream of each offer and answer names
the relay; each stream's packets reach the other side from the relay; the
dispatcher reports each stream with its media type (and the audio replaced
by the fax as closed); the session is gone after the BYE.
"""

from functools import partial

import pytest

from tests.flows.helpers import (
    IMAGE_PORT,
    PORT_RANGES,
    VIDEO_PORT,
    address,
    assert_names_relay,
    audio_running,
    exchange,
    rtp,
    stream_of,
    udptl,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

PACKETS = 50


def relayed_both_ways(r, stream: dict, port: int, make_packet) -> None:
    """Both sides send PACKETS packets of ``stream`` from ``port`` to the relay ports it names;
    each gets (nearly) all the other sent, from the relay port it sends to."""
    relay = r.topo.address("relay1")
    caller_facing, callee_facing = address(stream["caller_local"]), address(stream["callee_local"])
    caller, callee = exchange(r.topo, port, caller_facing, callee_facing, make_packet, PACKETS)
    assert caller.sources == {caller_facing} and callee.sources == {callee_facing}, (caller.sources, callee.sources)
    assert caller_facing[0] == callee_facing[0] == relay
    assert len(caller.received) >= PACKETS - 5 and len(callee.received) >= PACKETS - 5, (
        len(caller.received), len(callee.received))  # fmt: skip
    assert {data for data, _ in caller.received} <= {make_packet(n) for n in range(PACKETS)}


def test_audio_and_video(rig, forwarding):
    r = rig().start(kernel_forwarding=forwarding)
    relay, port_range = r.topo.address("relay1"), PORT_RANGES["relay1"]
    caller, callee = r.call("uac_video.xml", "uas_video.xml")

    def both_streams(session):
        return [s["media_type"] for s in session["streams"]] == ["audio", "video"] and audio_running(
            {**session, "streams": session["streams"][:1]}
        )

    session = r.wait_session(both_streams, "the call with its audio running and a video stream")
    call_id = session["call_id"]
    video = stream_of(session, "video")
    assert video["status"] == "active", video

    relayed_both_ways(r, video, VIDEO_PORT, partial(rtp, 96))

    # Both streams relayed, each reported with its type, codec and traffic.
    session = r.session(call_id)
    audio, video = stream_of(session, "audio"), stream_of(session, "video")
    assert audio_running({**session, "streams": [audio]}), audio
    assert (video["status"], video["caller_codec"], video["callee_codec"]) == ("active", "Dynamic(96)", "Dynamic(96)")
    assert video["caller_packets"] >= PACKETS - 5 and video["callee_packets"] >= PACKETS - 5, video
    assert video["caller_local"] != audio["caller_local"] and video["callee_local"] != audio["callee_local"]
    summary = r.relay_summary("relay1")
    assert summary["stream_count"] == {"audio": 1, "video": 1}, summary
    if forwarding == "yes":
        r.wait_kernel_entries(at_least=2)  # both streams carried by the kernel

    caller.step(call_id)  # hang up
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    r.wait_no_sessions()

    # The offer and the answer name the relay for both streams, on the ports the statistics show.
    [offer], [answer] = callee.received_sdps(), caller.received_sdps()
    for media_type, stream in (("audio", audio), ("video", video)):
        assert assert_names_relay(offer, relay, port_range, media_type) == address(stream["callee_local"])[1]
        assert assert_names_relay(answer, relay, port_range, media_type) == address(stream["caller_local"])[1]

    record = r.wait_accounted(call_id)
    assert [(s["media_type"], s["status"]) for s in record["streams"]] == [("audio", "closed"), ("video", "closed")]
    assert record["streams"][1]["caller_packets"] >= PACKETS - 5, record


def test_audio_switched_to_t38(rig, forwarding):
    r = rig().start(kernel_forwarding=forwarding)
    relay, port_range = r.topo.address("relay1"), PORT_RANGES["relay1"]
    caller, callee = r.call("uac_t38.xml", "uas_t38.xml")

    session = r.wait_session(audio_running, "the call's audio both ways")
    call_id = session["call_id"]
    audio = stream_of(session, "audio")

    caller.step(call_id)  # re-INVITE: m=image udptl t38 instead of the audio
    caller.wait_message("sent", "ACK", cseq="2 ACK")
    session = r.session(call_id)
    # The audio stream is closed (its ports released), the fax has a stream of its own.
    assert [(s["media_type"], s["status"]) for s in session["streams"]] == [("audio", "closed"), ("image", "active")]
    image = stream_of(session, "image")
    assert image["caller_local"] != audio["caller_local"], (audio, image)

    relayed_both_ways(r, image, IMAGE_PORT, udptl)

    image = stream_of(r.session(call_id), "image")
    assert image["status"] == "active", image
    assert image["caller_packets"] >= PACKETS - 5 and image["callee_packets"] >= PACKETS - 5, image
    assert image["caller_codec"] == image["callee_codec"] == "Unknown", image  # UDPTL has no RTP payload type
    summary = r.relay_summary("relay1")
    assert summary["stream_count"] == {"image": 1}, summary
    if forwarding == "yes":
        assert r.wait_kernel_entries()["kernel_entries"] == 1  # the fax's, the audio's went with its stream

    caller.step(call_id)  # hang up
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    r.wait_no_sessions()

    # The re-INVITE and its answer kept the call relayed: m=image on relay ports, and no audio left.
    offers, answers = callee.received_sdps(), caller.received_sdps()
    assert len(offers) == len(answers) == 2, (offers, answers)
    for sdp, side in ((offers[1], "callee_local"), (answers[1], "caller_local")):
        assert [(m.media, m.protocol) for m in sdp.media] == [("image", "udptl")], sdp
        assert assert_names_relay(sdp, relay, port_range, "image") == address(image[side])[1]
    assert assert_names_relay(offers[0], relay, port_range) == address(audio["callee_local"])[1]

    record = r.wait_accounted(call_id)
    assert [(s["media_type"], s["status"]) for s in record["streams"]] == [("audio", "closed"), ("image", "closed")]
