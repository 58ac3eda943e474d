"""Kernel entries carried over a relay restart (issue 10, item 4), against the fake kernel
of test_conntrack_table: what the start keeps, what it adopts, what it counts."""

import pytest
from test_conntrack_table import MARK, RELAY, FakeNetlink, latched_stream

from mediaproxy.relay.kernel import ctnetlink
from mediaproxy.relay.kernel.adoption import entries_from_state, entry_state, saved_flows
from mediaproxy.relay.kernel.conntrack import ConntrackTable, entry_for
from mediaproxy.relay.kernel.ctnetlink import Entry, Tuple5
from mediaproxy.relay.streams import CALLEE, CALLER, RTCP, RTP

PORT_RANGE = (40000, 40100)


def counted(stream):
    return [(leg.packet_count, leg.byte_count) for leg in stream.legs]


@pytest.fixture
def before_restart():
    """The kernel and the saved entries of a call whose RTP and RTCP the kernel relays, 10 and
    8 packets counted and read by the relay that saved it."""
    netlink = FakeNetlink()
    table = ConntrackTable(netlink, None, RELAY, MARK, "mediaproxy-4d50")
    stream = latched_stream()
    table.install([entry_for(stream, RTP, RELAY), entry_for(stream, RTCP, RELAY)])
    rtp = netlink.entries[Tuple5("198.51.100.10", RELAY, 4000, 40000)]
    rtp.orig_packets, rtp.orig_bytes, rtp.reply_packets, rtp.reply_bytes = 10, 10 * 200, 8, 8 * 200
    table.refresh_counters()
    return netlink, stream, [entry_state(entry) for entry in table.entries()]


def new_table(netlink):
    return ConntrackTable(netlink, None, RELAY, MARK, "mediaproxy-4d50")


def test_the_start_keeps_the_saved_entries_and_removes_the_other_leftovers(before_restart):
    netlink, stream, saved = before_restart
    stranger = Tuple5("198.51.100.99", RELAY, 9000, 40050)
    netlink.entries[stranger] = Entry(ctnetlink.MSG_NEW, stranger, None, mark=MARK, proto=17)
    keep = saved_flows(saved, RELAY)
    assert keep == {Tuple5("198.51.100.10", RELAY, 4000, 40000), Tuple5("198.51.100.10", RELAY, 4001, 40001)}
    assert new_table(netlink).remove_leftovers(PORT_RANGE, keep) == 1
    assert set(netlink.entries) == keep


def test_adopted_entries_count_on_from_what_was_saved(before_restart):
    netlink, old_stream, saved = before_restart
    restored = latched_stream()                      # the same call, rebuilt from the state file
    for mine, theirs in zip(restored.legs, old_stream.legs):
        mine.packet_count, mine.byte_count = theirs.packet_count, theirs.byte_count
    # the kernel relayed 50 more packets each way while no relay ran
    rtp = netlink.entries[Tuple5("198.51.100.10", RELAY, 4000, 40000)]
    rtp.orig_packets, rtp.orig_bytes, rtp.reply_packets, rtp.reply_bytes = 60, 60 * 200, 58, 58 * 200
    before = counted(restored)

    table = new_table(netlink)
    entries, orphans = entries_from_state(saved, {40000: restored}, RELAY)
    adopted, gone = table.adopt(entries, orphans)
    assert (len(adopted), gone, orphans) == (2, [], [])
    assert restored.in_kernel and table.relays(restored, RTP) and table.relays(restored, RTCP)
    assert set(table.kernel_ports) == {40000, 40001, 40002, 40003}
    assert counted(restored) == [(before[0][0] + 50, before[0][1] + 50 * 172),
                                 (before[1][0] + 50, before[1][1] + 50 * 172)]
    table.refresh_counters()                         # read again: nothing counted twice
    assert counted(restored)[0][0] == before[0][0] + 50


def test_an_entry_gone_meanwhile_and_one_of_no_restored_call(before_restart):
    netlink, _, saved = before_restart
    del netlink.entries[Tuple5("198.51.100.10", RELAY, 4001, 40001)]          # RTCP timed out meanwhile
    other = latched_stream(40010, 40012)
    other.leg(CALLER).latched = [("198.51.100.10", 5000), ("198.51.100.10", 5001)]
    orphan_saved = entry_state(entry_for(other, RTP, RELAY))
    orphan = Tuple5("198.51.100.10", RELAY, 5000, 40010)
    netlink.entries[orphan] = Entry(ctnetlink.MSG_NEW, orphan, None, mark=MARK, proto=17)

    restored = latched_stream()
    table = new_table(netlink)
    entries, orphans = entries_from_state(saved + [orphan_saved, {"port": "x"}], {40000: restored}, RELAY)
    assert orphans == [orphan]
    adopted, gone = table.adopt(entries, orphans)
    assert [entry.component for entry in adopted] == [RTP] and [entry.component for entry in gone] == [RTCP]
    assert orphan not in netlink.entries
    assert table.relays(restored, RTP) and not table.relays(restored, RTCP)
    assert restored.leg(CALLEE).media_seen[RTP] is True
