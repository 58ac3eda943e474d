"""Netlink sockets to the kernel's connection tracking.

ConntrackSocket sends requests in batches (many messages in one send, the
acknowledgements read back together) and dumps entries by mark; it blocks
for at most a few milliseconds per batch. EventSocket receives destroy
events without blocking, for the reactor to read.
"""

import errno
import itertools
import socket
import struct

from pyroute2.netlink import NLM_F_ACK

from mediaproxy.relay.kernel import ctnetlink
from mediaproxy.relay.kernel.ctnetlink import Ack, Done, Entry

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10           # acknowledgements without a copy of the request
SO_RCVBUFFORCE = 33
BATCH_BYTES = 60000            # one send: comfortably below the socket's send buffer
RECEIVE_SIZE = 1 << 20
EVENT_BUFFER = 16 << 20        # destroy events of thousands of entries at once (FIELD-NOTES 9)


class NetlinkError(OSError):
    pass


def _open(groups: int = 0, receive_buffer: int = 4 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except OSError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((0, groups))
    return sock


class ConntrackSocket:
    def __init__(self, timeout: float = 2.0):
        self.sock = _open()
        self.sock.settimeout(timeout)
        self._seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        return next(self._seq) & 0xFFFFFFFF or next(self._seq)

    def transact(self, requests) -> dict:
        """Send (seq, message) pairs in batches; returns {seq: errno} (0 = done) and Entries of gets by seq.

        Only the last message of a batch asks for an acknowledgement: the
        kernel carries a batch out in order and reports every failure anyway,
        so that one acknowledgement says the whole batch is done. (An
        acknowledgement per message costs a recv() each: most of the time.)
        """
        results, entries = {}, {}
        batch, seqs, size = [], [], 0
        for seq, message in requests:
            if size + len(message) > BATCH_BYTES and batch:
                self._send_and_collect(batch, seqs, results, entries)
                batch, seqs, size = [], [], 0
            batch.append(message)
            seqs.append(seq)
            size += len(message)
        if batch:
            self._send_and_collect(batch, seqs, results, entries)
        return {"errors": results, "entries": entries}

    def _send_and_collect(self, batch, seqs, results, entries) -> None:
        data = bytearray(b"".join(batch))
        offset = 0
        for message in batch[:-1]:
            flags = struct.unpack_from("=H", data, offset + 6)[0]
            struct.pack_into("=H", data, offset + 6, flags & ~NLM_F_ACK)
            offset += len(message)
        self.sock.send(data)
        last = seqs[-1]
        while last not in results:
            try:
                received = self.sock.recv(RECEIVE_SIZE)
            except socket.timeout:
                raise NetlinkError(errno.ETIMEDOUT, "the kernel did not answer %d conntrack requests" % len(seqs))
            for message in ctnetlink.decode_messages(received):
                if isinstance(message, Ack):
                    results[message.seq] = message.errno
                elif isinstance(message, Entry):
                    entries[message.seq] = message
        for seq in seqs:
            results.setdefault(seq, 0)

    def dump(self, mark, family: int = socket.AF_INET) -> list:
        """Every entry with `mark` (every entry for None), counters included."""
        seq = self.next_seq()
        self.sock.send(ctnetlink.encode_dump(seq, mark, family))
        found = []
        while True:
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except socket.timeout:
                raise NetlinkError(errno.ETIMEDOUT, "the kernel did not finish the conntrack dump")
            for message in ctnetlink.decode_messages(data):
                if isinstance(message, Entry) and message.seq == seq:
                    found.append(message)
                elif isinstance(message, Done) and message.seq == seq:
                    return found
                elif isinstance(message, Ack) and message.seq == seq and message.errno:
                    raise NetlinkError(message.errno, "conntrack dump refused")


class WalkSocket:
    """The evicting walk of the table (ctnetlink.encode_evicting_walk) on a socket of its own,
    its answer (only its end: it lists nothing) read without blocking."""

    def __init__(self):
        self.sock = _open()
        self.sock.setblocking(False)
        self._seqs = itertools.count(1)
        self.seq = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def start(self, family: int = socket.AF_INET) -> None:
        self.seq = next(self._seqs)
        self.sock.send(ctnetlink.encode_evicting_walk(self.seq, family))

    def finished(self) -> bool:
        """Whether the walk has ended, from what the kernel has sent so far."""
        try:
            data = self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return False
        for message in ctnetlink.decode_messages(data):
            if message.seq != self.seq:
                continue
            if isinstance(message, Done):
                return True
            if isinstance(message, Ack) and message.errno:
                raise NetlinkError(message.errno, "conntrack walk refused")
        return False


class EventSocket:
    """Destroy events of conntrack entries, read without blocking."""

    def __init__(self):
        self.sock = _open(groups=1 << (ctnetlink.NFNLGRP_CONNTRACK_DESTROY - 1), receive_buffer=EVENT_BUFFER)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self):
        """(entries, overflowed): the events waiting now; overflowed means some were lost."""
        entries, overflowed = [], False
        while True:
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return entries, overflowed
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    overflowed = True
                    continue
                raise
            entries.extend(m for m in ctnetlink.decode_messages(data) if isinstance(m, Entry))
