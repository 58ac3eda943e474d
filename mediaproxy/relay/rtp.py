"""What the relay reads from media packets: STUN and RTP payload types (sans-IO)."""

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"

# RFC 3551 static payload types, named as the original MediaProxy reported them.
STATIC_PAYLOAD_TYPES = {
    0: "G711u", 3: "GSM", 4: "G723", 5: "DVI4", 6: "DVI4", 7: "LPC", 8: "G711a", 9: "G722",
    10: "L16", 11: "L16", 12: "QCELP", 13: "CN", 14: "MPA", 15: "G728", 16: "DVI4", 17: "DVI4",
    18: "G729", 25: "CelB", 26: "JPEG", 28: "nv", 31: "H261", 32: "MPV", 33: "MP2T", 34: "H263",
}


def is_stun(data: bytes) -> bool:
    return len(data) >= 20 and data[0] & 0xC0 == 0 and data[4:8] == STUN_MAGIC_COOKIE


def rtp_payload_type(data: bytes):
    """The payload type of an RTP packet, or None for anything else (RTCP included)."""
    if len(data) < 12 or data[0] & 0xC0 != 0x80:
        return None
    payload_type = data[1] & 0x7F
    if 64 <= payload_type <= 95:    # RTCP multiplexed on the RTP port (RFC 5761)
        return None
    return payload_type


def codec_name(payload_type: int) -> str:
    if payload_type >= 96:
        return "Dynamic(%d)" % payload_type
    return STATIC_PAYLOAD_TYPES.get(payload_type, "Unknown(%d)" % payload_type)
