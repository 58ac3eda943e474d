"""The parsers the end-to-end tests rely on (no root, no namespaces needed)."""

import struct
from pathlib import Path

import pytest

from tests.e2e.helpers import sip_header, sipp_messages
from tests.support.pcap import parse_rtp, parse_sdp, read_udp_packets

G711A_PCAP = Path("/usr/share/sip-tester/g711a.pcap")


def ipv4_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, fragment: int = 0) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, fragment, 64, 17, 0, src, dst) + udp


def pcap_file(path: Path, linktype: int, frames: list[bytes], big_endian: bool = False) -> Path:
    order = ">" if big_endian else "<"
    data = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for n, frame in enumerate(frames):
        data += struct.pack(order + "IIII", 1000 + n, 500000, len(frame), len(frame)) + frame
    path.write_bytes(data)
    return path


RTP = bytes([0x80, 0x08]) + struct.pack("!HII", 7, 160, 0x1234) + b"\xd5" * 160


def test_reads_sll_and_ethernet_in_both_byte_orders(tmp_path):
    packet = ipv4_udp(bytes([198, 18, 0, 5]), bytes([198, 18, 0, 20]), 50002, 6000, RTP)
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\0" * 8, 0x0800) + packet
    ethernet = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + packet
    vlan = b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x07\x08\x00" + packet
    arp = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x06" + b"\0" * 28
    expected = ("198.18.0.5:50002", "198.18.0.20:6000", RTP)

    packets = read_udp_packets(pcap_file(tmp_path / "sll.pcap", 113, [sll]))
    assert [(p.source, p.destination, p.payload) for p in packets] == [expected]
    assert packets[0].time == pytest.approx(1000.5)

    packets = read_udp_packets(pcap_file(tmp_path / "eth.pcap", 1, [arp, ethernet, vlan], big_endian=True))
    assert [(p.source, p.destination, p.payload) for p in packets] == [expected, expected]
    assert [p.time for p in packets] == pytest.approx([1001.5, 1002.5])


def test_skips_fragments_and_tolerates_a_cut_file(tmp_path):
    whole = ipv4_udp(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2, b"x")
    fragment = ipv4_udp(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2, b"y", fragment=0x2000)
    path = pcap_file(tmp_path / "raw.pcap", 101, [fragment, whole])
    path.write_bytes(path.read_bytes()[:-3])  # tcpdump killed mid-write
    assert read_udp_packets(path) == []
    path.write_bytes(b"")
    assert read_udp_packets(path) == []


@pytest.mark.skipif(not G711A_PCAP.exists(), reason="sip-tester not installed")
def test_reads_sipps_g711a_pcap():
    packets = read_udp_packets(G711A_PCAP)
    assert len(packets) == 236
    assert {parse_rtp(p.payload).payload_type for p in packets} == {8}
    assert packets[0].source == "10.1.3.143:5000"


def test_rtp_header():
    header = parse_rtp(RTP)
    assert (header.payload_type, header.sequence, header.timestamp, header.ssrc, header.payload_length) == (
        8,
        7,
        160,
        0x1234,
        160,
    )
    assert parse_rtp(b"\x80\xc8" + b"\0" * 26) is None  # RTCP sender report
    assert parse_rtp(b"\x00" * 20) is None


TRACE = """\
----------------------------------------------- 2026-11-25 22:38:25.392258
UDP message received [300] bytes :

INVITE sip:service@198.18.0.20:5060 SIP/2.0
Call-ID: 1-6542@198.18.0.10
Content-Type: application/sdp

v=0
o=caller 1 2 IN IP4 198.18.0.10
s=-
c=IN IP4 198.18.0.5
t=0 0
m=audio 50002 RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=sendrecv

----------------------------------------------- 2026-11-25 22:38:25.393000
UDP message sent [200] bytes :

SIP/2.0 100 Trying
Call-ID: 1-6542@198.18.0.10

"""


def test_sipp_trace_and_sdp(tmp_path):
    path = tmp_path / "messages.log"
    path.write_text(TRACE)
    messages = sipp_messages(path)
    assert [direction for direction, _ in messages] == ["received", "sent"]
    invite = messages[0][1]
    assert sip_header(invite, "call-id") == "1-6542@198.18.0.10"
    sdp = parse_sdp(invite)
    audio = sdp.audio()
    assert (audio.connection, audio.port, audio.formats) == ("198.18.0.5", 50002, ("8", "101"))
    assert audio.direction == "sendrecv"
    assert audio.rtpmap() == {8: "PCMA/8000"}
    assert sipp_messages(tmp_path / "missing.log") == []
