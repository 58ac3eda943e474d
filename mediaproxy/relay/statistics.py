"""The one builder of session statistics (SPEC §6) used by `sessions`,
`remove`, `expired` and accounting, and of the relay's summary."""

from collections import Counter

from mediaproxy.relay.streams import CALLEE, CALLER


def _address(address) -> str:
    if address is None:
        return "Unknown"
    ip, port = address
    return "%s:%d" % (ip, port)


def stream_statistics(stream, session, advertised_ip: str, now: float) -> dict:
    base = session.start_time if session.start_time is not None else session.created
    end = stream.end_time if stream.end_time is not None else now
    caller, callee = stream.leg(CALLER), stream.leg(CALLEE)
    post_dial_delay = None
    if stream.first_media_time is not None:
        post_dial_delay = round(stream.first_media_time - session.created, 3)
    return {
        "media_type": stream.media_type,
        "status": stream.current_status,
        "timeout_wait": stream.timeout_wait,
        "caller_codec": caller.codec or "Unknown",
        "callee_codec": callee.codec or "Unknown",
        "start_time": round(max(stream.created - base, 0.0), 3),
        "end_time": round(max(end - base, 0.0), 3),
        "post_dial_delay": post_dial_delay,
        "caller_bytes": caller.byte_count,
        "callee_bytes": callee.byte_count,
        "caller_packets": caller.packet_count,
        "callee_packets": callee.packet_count,
        # beyond SPEC §6: packets from other addresses than the latched party's, dropped
        "caller_dropped": caller.dropped,
        "callee_dropped": callee.dropped,
        "caller_local": "%s:%d" % (advertised_ip, caller.port),
        "callee_local": "%s:%d" % (advertised_ip, callee.port),
        "caller_remote": _address(caller.latched_rtp or caller.sdp_address),
        "callee_remote": _address(callee.latched_rtp or callee.sdp_address),
    }


def session_statistics(session, advertised_ip: str, now: float) -> dict:
    end = session.end_time if session.end_time is not None else now
    duration = round(end - session.start_time, 3) if session.start_time is not None else 0
    return {
        "call_id": session.call_id,
        "from_tag": session.from_tag,
        "to_tag": session.to_tag,
        "from_uri": session.from_uri,
        "to_uri": session.to_uri,
        "caller_ua": session.caller_ua,
        "callee_ua": session.callee_ua,
        "username": session.username,
        "dialog_id": session.dialog_id,
        "start_time": session.start_time,
        "duration": duration,
        "streams": [stream_statistics(stream, session, advertised_ip, now) for stream in session.all_streams],
    }


def relay_summary(relay, now: float) -> dict:
    stream_count = Counter()
    for session in relay.sessions.values():
        for stream in session.active_streams:
            stream_count[stream.media_type] += 1
    return {
        "ip": relay.advertised_ip,
        "version": relay.version,
        "status": "halting" if relay.halting else "active",
        "uptime": int(now - relay.started),
        "session_count": len(relay.sessions),
        "stream_count": dict(stream_count),
        "bps_relayed": relay.bps_relayed,
        "dropped_packets": relay.forwarding.packets_dropped,    # since start, by all streams (beyond SPEC §5)
    }
