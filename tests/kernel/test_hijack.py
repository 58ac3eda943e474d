"""Media hijack (issue 9 item 3, SPEC §4): a third party spraying the relay's
ports cannot divert or inject the media of a call the kernel relays.

The rig of tests/kernel/helpers.py plus an ``intruder`` namespace
(198.18.0.30) on the same LAN. The intruder sends RTP-looking packets
marked ``INTRUDER`` from its own address (a UDP socket) and from spoofed
ones (a raw socket writing its own IP headers): the caller's IP with
another port, and each party's exact address to the port facing the other
party. Its targets are the call's four relay ports and every other port of
the relay's range. What the parties receive is kept and searched for the
mark; the relay's statistics must count every packet of the intruder to a
call port as dropped, and nothing else.
"""

import shutil
import socket
import struct
import time
from collections import Counter

import pytest

from tests.integration.daemons import rtp_packet
from tests.kernel.helpers import (
    CALLER_PORT,
    HOSTS,
    PORT_RANGE,
    RTCP,
    RTP,
    build_rig,
    kernel_call,
    pump,
    sent_counters,
    settle,
    stream_counters,
)
from tests.support.netns import ADDRESSES, socket_in_netns
from tests.support.processes import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

INTRUDER_HOST, INTRUDER_IP = "intruder", "198.18.0.30"
INTRUDER_PORT = 9000
MARK = b"INTRUDER"


@pytest.fixture
def rig(kernel_tools, make_topology, processes, tmp_path):
    """The kernel tests' rig (dispatcher running, relay to start) with an intruder on the LAN."""
    topo = make_topology({**{host: ADDRESSES[host] for host in HOSTS}, INTRUDER_HOST: INTRUDER_IP})
    rig, workdir = build_rig(topo, tmp_path)
    try:
        yield rig
    finally:
        try:
            rig.close()
            processes.stop_all()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def udp_datagram(source, destination, payload: bytes) -> bytes:
    """An IPv4 UDP datagram with its own header (the kernel fills in the IP checksum; UDP's is 0: none)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(destination[0]))
    return header + struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload


class Intruder:
    """Sends marked packets to relay ports, from its own address or a spoofed one; counts them per port."""

    def __init__(self, rig):
        self.relay_ip = rig.relay_ip
        self.udp = rig.topo.socket(INTRUDER_HOST, type=socket.SOCK_DGRAM)
        self.udp.bind((INTRUDER_IP, INTRUDER_PORT))
        self.raw = socket_in_netns(rig.topo.ns(INTRUDER_HOST), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sent = Counter()             # relay port -> packets
        self.seq = 0

    def send(self, port: int, source=None) -> None:
        self.seq += 1
        payload = rtp_packet(0, self.seq, 0x1BAD1BAD, MARK * 20)
        if source is None:
            self.udp.sendto(payload, (self.relay_ip, port))
        else:
            self.raw.sendto(udp_datagram(source, (self.relay_ip, port), payload), (self.relay_ip, 0))
        self.sent[port] += 1

    def close(self) -> None:
        self.udp.close()
        self.raw.close()


def exchange(caller, callee, call, rounds: int, attack=None, rate: float = 150.0, rtcp_every: int = 10,
             caller_talks: bool = True, wait_quiet: bool = True) -> None:
    """Both parties send RTP (and RTCP every ``rtcp_every``) at ``rate``; ``attack(n)`` runs each round;
    then (``wait_quiet``) wait until nothing more arrives."""
    start = time.monotonic()
    for n in range(rounds):
        if caller_talks:
            caller.send_rtp(call.caller_facing)
        callee.send_rtp(call.callee_facing)
        if n % rtcp_every == 0:
            if caller_talks:
                caller.send_rtcp(call.caller_facing)
            callee.send_rtcp(call.callee_facing)
        if attack is not None:
            attack(n)
        caller.drain()
        callee.drain()
        delay = start + (n + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    if wait_quiet:
        settle(caller, callee)


def assert_nothing_of_the_intruder(*parties) -> None:
    for party in parties:
        for component in (RTP, RTCP):
            marked = [source for data, source in party.received[component] if MARK in data]
            assert marked == [], f"{party.host} received the intruder's packets from {set(marked)}"


def assert_heard_only_the_relay(party, relay_port, relay_ip) -> None:
    for component in (RTP, RTCP):
        assert party.sources(component) <= {(relay_ip, relay_port + component)}, (party.host, component)


def tuples(rig) -> set:
    return {(entry.orig, entry.reply) for entry in rig.entries()}


def test_an_intruder_spraying_a_kernel_relayed_call_is_dropped_and_counted(rig):
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "sprayed-call")
    before = rig.summary()
    entries = tuples(rig)
    assert len(entries) == 2 and before["parked_ports"] == 4
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)

    A, B = call.caller_facing_port, call.callee_facing_port
    call_ports = (A, A + 1, B, B + 1)
    others = [port for port in range(*PORT_RANGE) if port not in call_ports]
    intruder = Intruder(rig)
    spoofs = [
        ((caller.ip, caller.port + 50), A),          # the caller's IP from another port
        ((caller.ip, caller.port + 51), A + 1),
        ((callee.ip, callee.port), A),               # each party's exact address, to the other party's port
        ((caller.ip, caller.port + 1), B + 1),
    ]

    def attack(n):
        for port in call_ports:
            intruder.send(port)
        for source, port in spoofs:
            intruder.send(port, source)
        intruder.send(others[n % len(others)])

    try:
        exchange(caller, callee, call, rounds=200, attack=attack)       # 1.3 s
    finally:
        intruder.close()

    # The parties heard each other, every packet, from the relay's ports, and nothing of the intruder.
    assert_nothing_of_the_intruder(caller, callee)
    assert callee.received_count(RTP) - heard_by_callee == 200
    assert caller.received_count(RTP) - heard_by_caller == 200
    assert_heard_only_the_relay(caller, A, call.relay_ip)
    assert_heard_only_the_relay(callee, B, call.relay_ip)

    # The kernel still relays the call through the same entries; the relay process forwarded
    # nothing, and with strict source the intruder woke none of the call's parked ports.
    expected_caller_drops = intruder.sent[A] + intruder.sent[A + 1]
    expected_callee_drops = intruder.sent[B] + intruder.sent[B + 1]
    assert (expected_caller_drops, expected_callee_drops) == (1000, 600)

    def counted():
        [stream] = rig.session("sprayed-call")["streams"]
        return stream["caller_dropped"] + stream["callee_dropped"] >= 1600 and stream

    stream = wait_for(counted, timeout=5, interval=0.1, message="the relay to count the intruder's packets")
    assert (stream["caller_dropped"], stream["callee_dropped"]) == (expected_caller_drops, expected_callee_drops)
    assert stream_counters(stream) == sent_counters(caller, callee), stream
    assert stream["caller_remote"] == f"{caller.ip}:{caller.port}"
    after = rig.summary()
    assert after["dropped_packets"] == 1600
    assert after["userspace_packets"] == before["userspace_packets"]
    assert (after["kernel_entries"], after["parked_ports"]) == (2, 4)
    assert tuples(rig) == entries
    assert rig.inhibitor_rules() == []
    log = rig.relay.process.log_text()
    assert log.count("session sprayed-call: dropping packets from") == 2      # one line per leg

    assert call.remove() == "removed"
    [stream] = rig.wait_accounted("sprayed-call")["streams"]
    assert (stream["caller_dropped"], stream["callee_dropped"]) == (expected_caller_drops, expected_callee_drops)


def test_without_strict_source_an_intruder_gains_nothing_and_a_party_that_moves_is_latched_anew(rig):
    rig.start_relay({"strict_source": "no", "relatch_after": 0.5})
    caller, callee, call = kernel_call(rig, "moving-call")
    entries = tuples(rig)
    A = call.caller_facing_port
    intruder = Intruder(rig)
    try:
        # Its first packets wake the caller's ports (a new source may be heard), then it sprays them
        # for over twice relatch_after while both parties talk: the caller keeps its place.
        for port in (A, A + 1):
            intruder.send(port)
        wait_for(lambda: {A, A + 1} <= rig.listening_ports(), timeout=5, interval=0.05,
                 message="the intruder's packets to wake the caller's ports")
        heard_by_callee = callee.received_count(RTP)

        def attack(n):
            intruder.send(A)
            intruder.send(A + 1)

        exchange(caller, callee, call, rounds=200, attack=attack)     # 1.3 s
    finally:
        intruder.close()
    assert_nothing_of_the_intruder(caller, callee)
    assert callee.received_count(RTP) - heard_by_callee == 200
    assert tuples(rig) == entries
    [stream] = rig.session("moving-call")["streams"]
    assert (stream["caller_dropped"], stream["callee_dropped"]) == (402, 0)
    assert "latched anew" not in rig.relay.process.log_text()

    # The caller's NAT rebinds: it falls silent on its old port and talks from a new one. Once its old
    # address has been silent for relatch_after, the new one is latched and handed to the kernel.
    caller.bind(CALLER_PORT + 100)

    def relatched():
        exchange(caller, callee, call, rounds=15, wait_quiet=False)
        return tuples(rig) == set(call.expected_entries().values())

    wait_for(relatched, timeout=8, interval=0, message="the kernel to relay the caller's new port")
    settle(caller, callee)
    rig.relay.process.wait_for_log(
        rf"session moving-call: the caller's audio RTP moved from {caller.ip}:{CALLER_PORT} to "
        rf"{caller.ip}:{CALLER_PORT + 100} after \d+\.\d s of silence: latched anew", timeout=1)

    userspace = rig.summary()["userspace_packets"]
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)
    pump(caller, callee, call, packets=100)
    assert callee.received_count(RTP) - heard_by_callee == 100
    assert caller.received_count(RTP) - heard_by_caller == 100
    assert rig.summary()["userspace_packets"] == userspace
    assert_heard_only_the_relay(caller, A, call.relay_ip)
    assert rig.inhibitor_rules() == []
    [stream] = rig.session("moving-call")["streams"]
    assert stream["caller_remote"] == f"{caller.ip}:{CALLER_PORT + 100}"
    assert call.remove() == "removed"
    assert rig.entries() == []
