"""Calls through the real dispatcher for the accounting tests, and what their
records must hold (SPEC §6 statistics, §7 attributes)."""

from __future__ import annotations

import json
import time

from tests.accounting.servers import OUR_DICTIONARY  # noqa: F401  (re-exported for the tests)
from tests.integration.daemons import Party, ProxyClient, exchange_media, parse_address_reply
from tests.support.processes import wait_for

RTP_SIZE = 12 + len("caller") + 150          # what Party.send puts on the wire (both names have 6 letters)
CODECS = {0: "G711u", 8: "G711a"}

RELAY_A = "127.0.0.2"          # keeps its streams (stream_timeout 90)
RELAY_B = "127.0.0.3"          # stream_timeout 2: a silent answered call expires there
SILENT_TIMEOUT = 2             # (1 would do, 2 leaves a loaded machine time to list the session first)


def signaling_ip(username: str | None) -> str:
    """The proxy module's signaling_ip header: the JSON form when it knows the user."""
    if username is None:
        return "127.0.0.1"
    return json.dumps({"signaling_ip": "127.0.0.1", "username": username})


class AnsweredCall:
    """A call set up through the proxy socket (offer, then answer with a to-tag),
    with real parties on loopback that can send RTP through the relay."""

    def __init__(self, proxy: ProxyClient, call_id: str, relay: str, username: str | None = None,
                 dialog_id: str = "", ice: bool = False, caller_pt: int = 0, callee_pt: int = 8):
        self.call_id = call_id
        self.caller = Party("caller", caller_pt)
        self.callee = Party("callee", callee_pt)
        suffix = ":ice=yes" if ice else ""
        try:
            self.offered = time.time()
            offer = proxy.update(call_id, "request", self.caller.media() + suffix, media_relay=relay,
                                 dialog_id=dialog_id, signaling_ip=signaling_ip(username))
            self.relay_ip, (self.callee_facing_port,) = parse_address_reply(offer)
            assert self.relay_ip == relay, f"{call_id} went to {self.relay_ip}, not {relay}"
            answer = proxy.update(call_id, "reply", self.callee.media() + suffix, to_tag="callee-tag",
                                  dialog_id=dialog_id, signaling_ip=signaling_ip(username))
            self.answered = time.time()
            _, (self.caller_facing_port,) = parse_address_reply(answer)
        except BaseException:
            self.close()
            raise

    def exchange(self) -> None:
        exchange_media(self.caller, self.callee, (self.relay_ip, self.caller_facing_port),
                       (self.relay_ip, self.callee_facing_port))

    def close(self) -> None:
        self.caller.close()
        self.callee.close()


def answered_without_media(proxy: ProxyClient, call_id: str, relay: str | None = None) -> None:
    """Offer and answer (the session starts on the relay), no parties behind the SDP."""
    offer = proxy.update(call_id, "request", "audio:127.0.0.1:9:sendrecv", media_relay=relay)
    parse_address_reply(offer)
    answer = proxy.update(call_id, "reply", "audio:127.0.0.1:9:sendrecv", to_tag="callee-tag")
    parse_address_reply(answer)


def settled_session(cluster, call_id: str) -> tuple[dict, float]:
    """The session's statistics (management `sessions`) once its counters stopped moving,
    and the time (monotonic) just before they were asked for."""
    previous = {}

    def settled():
        nonlocal previous
        asked = time.monotonic()
        current = cluster.session(call_id)
        assert current is not None, f"session {call_id} is not listed"
        counters = [(s["caller_packets"], s["callee_packets"]) for s in current["streams"]]
        if counters == previous.get("counters"):
            return current, asked
        previous = {"counters": counters}
        return None

    return wait_for(settled, timeout=10, interval=0.2, message=f"the counters of {call_id} to settle")


def accounting_status(cluster) -> dict:
    """backend name -> its `accounting` line (queued, written, last_error)."""
    return {status["backend"]: status for status in map(json.loads, cluster.management_command("accounting"))}


def assert_info_is_the_statistics(info: dict, snapshot: dict, elapsed: float, *, status: str,
                                  timeout_wait: int, dialog_id: str, timed_out: bool, all_streams_ice: bool):
    """`info` (the accounted statistics) is the session as listed in `snapshot`
    when it ended `elapsed` seconds at most later: the same in every field but
    the ones that ending changes (duration, each stream's status, end_time,
    timeout_wait), plus the dispatcher's dialog_id, timed_out, all_streams_ice."""
    assert set(info) == set(snapshot) | {"dialog_id", "timed_out", "all_streams_ice"}, sorted(info)
    for key in set(snapshot) - {"duration", "streams", "dialog_id"}:
        assert info[key] == snapshot[key], f"{key}: accounted {info[key]!r}, listed {snapshot[key]!r}"
    assert (info["dialog_id"], info["timed_out"], info["all_streams_ice"]) == (dialog_id, timed_out,
                                                                                all_streams_ice)
    assert snapshot["duration"] <= info["duration"] <= snapshot["duration"] + elapsed + 0.01, (
        info["duration"], snapshot["duration"], elapsed)
    assert len(info["streams"]) == len(snapshot["streams"])
    for accounted, listed in zip(info["streams"], snapshot["streams"]):
        assert set(accounted) == set(listed)
        for key in set(listed) - {"status", "end_time", "timeout_wait"}:
            assert accounted[key] == listed[key], f"stream {key}: accounted {accounted[key]!r}, listed {listed[key]!r}"
        assert (accounted["status"], accounted["timeout_wait"]) == (status, timeout_wait)
        assert listed["end_time"] <= accounted["end_time"] <= listed["end_time"] + elapsed + 0.01


def expected_radius_attributes(info: dict, relay_ip: str) -> dict:
    """SPEC §7's attributes of a session's record, as FreeRADIUS' detail file shows
    them: Acct-Status-Type 3 is named Interim-Update there ('Update' in the
    radiusclient dictionaries of SIP proxies); empty strings are not sent."""
    streams = info["streams"]
    delays = [s["post_dial_delay"] for s in streams if s["post_dial_delay"] is not None]
    media_info = "timeout" if info["timed_out"] else "ICE session" if info["all_streams_ice"] else ""
    attributes = {
        "Acct-Status-Type": "Interim-Update",
        "User-Name": info["username"] or "mediaproxy@default",
        "Acct-Session-Id": info["call_id"],
        "Acct-Session-Time": round(info["duration"]),
        "Acct-Input-Octets": sum(s["caller_bytes"] for s in streams),
        "Acct-Output-Octets": sum(s["callee_bytes"] for s in streams),
        "Sip-From-Tag": info["from_tag"],
        "Sip-To-Tag": info["to_tag"],
        "NAS-IP-Address": relay_ip,
        "Acct-Delay-Time": round(delays[0]) if delays else 0,
        "Sip-User-Agents": "%s + %s" % (info["caller_ua"], info["callee_ua"]),
        "Sip-Applications": ", ".join(sorted({s["media_type"].title() for s in streams})),
        "Media-Codecs": ", ".join("%s/%s" % (s["caller_codec"], s["callee_codec"]) for s in streams),
        "Media-Info": media_info,
    }
    return attributes


def assert_radius_entry(entry: dict, info: dict, relay_ip: str) -> None:
    entry = dict(entry)
    assert isinstance(entry.pop("Timestamp", None), int), "the detail entry has no Timestamp"
    expected = expected_radius_attributes(info, relay_ip)
    if expected["Media-Info"] == "":
        # An empty string attribute is not valid RADIUS (RFC 2865 §5: 1-253 octets):
        # FreeRADIUS drops it if it is sent. Absent or empty are both fine.
        del expected["Media-Info"]
        assert entry.pop("Media-Info", "") == ""
    assert entry == expected


def start_cluster(cluster, accounting: str, sections: dict) -> None:
    """A dispatcher with these accounting backends, relay A and relay B (stream_timeout 2)."""
    cluster.start_dispatcher(accounting=accounting, sections=sections)
    cluster.start_relay(RELAY_A, wait=False)
    cluster.start_relay(RELAY_B, wait=False, stream_timeout=SILENT_TIMEOUT)
    cluster.wait_relays([RELAY_A, RELAY_B])


class Ended:
    """What one accounted call must look like: the session as listed just before
    it ended, how long before, and what ending made of it."""

    def __init__(self, call_id, relay, snapshot, elapsed, status, timeout_wait, dialog_id, timed_out,
                 all_streams_ice, call=None):
        self.call_id, self.relay, self.snapshot, self.elapsed = call_id, relay, snapshot, elapsed
        self.status, self.timeout_wait, self.dialog_id = status, timeout_wait, dialog_id
        self.timed_out, self.all_streams_ice, self.call = timed_out, all_streams_ice, call

    def check_info(self, info: dict) -> None:
        assert_info_is_the_statistics(info, self.snapshot, self.elapsed, status=self.status,
                                      timeout_wait=self.timeout_wait, dialog_id=self.dialog_id,
                                      timed_out=self.timed_out, all_streams_ice=self.all_streams_ice)
        if self.call is not None:
            check_media_call(info, self.call)


def check_media_call(info: dict, call: AnsweredCall) -> None:
    """What the test itself knows of the call with media: every packet each party sent, its
    size and payload type, the addresses and ports, the times, the user and the agents."""
    assert (info["call_id"], info["from_tag"], info["to_tag"]) == (call.call_id, "caller-tag", "callee-tag")
    assert (info["from_uri"], info["to_uri"]) == ("sip:alice@example.com", "sip:bob@example.com")
    assert (info["caller_ua"], info["callee_ua"], info["username"]) == ("caller-ua", "callee-ua", "alice")
    assert call.offered - 1 <= info["start_time"] <= call.answered + 1
    [stream] = info["streams"]
    assert stream["media_type"] == "audio"
    assert (stream["caller_codec"], stream["callee_codec"]) == (CODECS[call.caller.payload_type],
                                                                CODECS[call.callee.payload_type])
    assert (stream["caller_packets"], stream["callee_packets"]) == (call.caller.sent, call.callee.sent)
    assert (stream["caller_bytes"], stream["callee_bytes"]) == (RTP_SIZE * call.caller.sent,
                                                                RTP_SIZE * call.callee.sent)
    assert stream["caller_local"] == "%s:%d" % (call.relay_ip, call.caller_facing_port)
    assert stream["callee_local"] == "%s:%d" % (call.relay_ip, call.callee_facing_port)
    assert stream["caller_remote"] == "%s:%d" % (call.caller.ip, call.caller.port)
    assert stream["callee_remote"] == "%s:%d" % (call.callee.ip, call.callee.port)
    assert stream["post_dial_delay"] >= 1.2           # the test waited that long before the first packet
    assert info["duration"] >= stream["post_dial_delay"] - (call.answered - call.offered) - 0.01


def gone(cluster, call_ids) -> bool:
    listed = {session["call_id"] for session in cluster.sessions()}
    return not listed & set(call_ids)


def end_calls(cluster) -> tuple[list[Ended], int]:
    """The calls of the field tests; (the accounted ones, how many records the dispatcher submits).

    - call-removed: relay A, user alice, dialog 4321:8765, 1.3 s of post-dial delay, RTP both
      ways (G711u / G711a), removed;
    - call-expired: relay B, no user, dialog 11:22, answered and silent: expires after 2 s (timed out);
    - call-ice: relay B, ice=yes on both sides, silent: expires as unselected ICE candidates
      (not timed out, all_streams_ice);
    - call-unanswered: offered only, removed: not accounted;
    - call-removed again with the same call id and tags, answered, removed: a duplicate record.
    """
    ended = []
    with cluster.proxy() as proxy:
        silent = {}
        for call_id, dialog_id, ice in (("call-expired", "11:22", False), ("call-ice", "", True)):
            silent[call_id] = AnsweredCall(proxy, call_id, RELAY_B, dialog_id=dialog_id, ice=ice)
        listed = time.monotonic()              # before the snapshots: elapsed bounds how much later they ended
        snapshots = {call_id: cluster.session(call_id) for call_id in silent}
        assert None not in snapshots.values(), f"a silent call expired before it was listed: {snapshots}"
        wait_for(lambda: gone(cluster, silent), timeout=15, interval=0.2, message="the silent calls to expire")
        elapsed = time.monotonic() - listed
        for call in silent.values():
            call.close()
        ended.append(Ended("call-expired", RELAY_B, snapshots["call-expired"], elapsed, "no-traffic timeout",
                           SILENT_TIMEOUT, "11:22", True, False))
        ended.append(Ended("call-ice", RELAY_B, snapshots["call-ice"], elapsed, "unselected ICE candidate",
                           SILENT_TIMEOUT, None, False, True))

        call = AnsweredCall(proxy, "call-removed", RELAY_A, username="alice", dialog_id="4321:8765")
        try:
            time.sleep(max(0.0, call.offered + 1.3 - time.time()))     # the post-dial delay
            call.exchange()
            snapshot, listed = settled_session(cluster, "call-removed")
            assert proxy.remove("call-removed") == "removed"
            elapsed = time.monotonic() - listed
        finally:
            call.close()
        ended.append(Ended("call-removed", RELAY_A, snapshot, elapsed, "closed", 0, "4321:8765", False, False,
                           call))

        assert proxy.update("call-unanswered", "request", "audio:127.0.0.1:9:sendrecv",
                            media_relay=RELAY_A).startswith(RELAY_A)
        assert proxy.remove("call-unanswered") == "removed"

        answered_without_media(proxy, "call-removed", RELAY_A)           # the same ids again
        assert proxy.remove("call-removed") == "removed"
    return ended, 4
