"""The control-plane benchmark's client (bench/control.py): one process, run
inside the benchmark's relay namespace, that sets up and tears down sessions
the way a SIP proxy does, on one of two servers:

  ours       the dispatcher's UNIX socket, as the OpenSIPS/Kamailio mediaproxy
             module speaks it (SPEC §2): `update` (the caller's request),
             `update` (the callee's reply), `remove`;
  rtpengine  rtpengine's ng protocol (bencoded dictionaries over UDP after a
             cookie): `offer`, `answer`, `delete`.

The same loop drives both (blocking sockets, plain Python, nothing else
imported), so the client's own cost is the same on both sides. The process
stays up between jobs: it reads one JSON job a line on stdin and answers one
JSON line on stdout. A job waits until its start time (CLOCK_MONOTONIC, the
same in every process). A job is a list of slices, each on one server
from its start time to its end time (so that the servers can take turns
every fraction of a second and be measured in the same seconds):

  closed  runs sessions back to back until the end time;
  open    sends each request at its scheduled time (client j of n sends the
          k-th request of its sequence offer, answer, remove, offer, ... at
          start + (n*k + j) / request_rate) and measures its latency from that
          time, not from when it could be sent; the rate is `load` times the
          client's own rate in an earlier closed slice (`rate_of`). A client
          still busy with the slice before at the start time begins the
          schedule (and ends it) that much later: a server is not charged with
          the backlog of the one before it.

The answer, for each slice: sessions completed, errors (and the first few),
every request's latency in microseconds by kind and, in the open loop, how
late the client sent it (while its previous request was still unanswered, or
while it waited for a CPU), the client's CPU seconds and its wall time.
"""

import json
import os
import socket
import sys
import time

KINDS = ("offer", "answer", "remove")
TIMEOUT = 5.0


# -- bencode (the ng protocol's encoding) --

def bencode(value) -> bytes:
    if isinstance(value, dict):
        return b"d" + b"".join(bencode(str(k)) + bencode(v) for k, v in sorted(value.items())) + b"e"
    if isinstance(value, (list, tuple)):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, (bytes, bytearray)):
        return b"%d:%s" % (len(value), value)
    raise TypeError("cannot bencode %r" % type(value))


def bdecode(data: bytes):
    value, end = _bdecode(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after a bencoded value")
    return value


def _bdecode(data: bytes, i: int):
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if c == b"l":
        i += 1
        out = []
        while data[i:i + 1] != b"e":
            value, i = _bdecode(data, i)
            out.append(value)
        return out, i + 1
    if c == b"d":
        i += 1
        out = {}
        while data[i:i + 1] != b"e":
            key, i = _bdecode(data, i)
            value, i = _bdecode(data, i)
            out[key.decode() if isinstance(key, bytes) else key] = value
        return out, i + 1
    if c.isdigit():
        colon = data.index(b":", i)
        length = int(data[i:colon])
        start = colon + 1
        if start + length > len(data):
            raise ValueError("truncated bencoded string")
        return data[start:start + length], start + length
    raise ValueError("bad bencoded value at %d" % i)


# -- what both servers get --

def sdp(ip: str, port: int) -> str:
    """One audio stream (G.711 u/A-law and DTMF events), as a phone offers it."""
    return ("v=0\r\no=- 1545997027 1 IN IP4 %s\r\ns=-\r\nc=IN IP4 %s\r\nt=0 0\r\n"
            "m=audio %d RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n" % (ip, ip, port))


def media(ip: str, port: int) -> str:
    """The same SDP as the mediaproxy module describes it in the `media` header."""
    return "audio:%s:%d:sendrecv" % (ip, port)


class Failed(Exception):
    pass


class Ours:
    """The dispatcher's proxy socket, as the mediaproxy module uses it: one connection, many requests."""

    def __init__(self, job):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(job["target"])
        self.buffer = b""
        self.caller, self.callee = job["caller"], job["callee"]

    def close(self):
        self.sock.close()

    def _ask(self, text: str) -> str:
        self.sock.sendall(text.encode())
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Failed("the dispatcher closed the proxy socket")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode()

    def _update(self, call_id, kind, ip, port, to_tag, user_agent):
        reply = self._ask(
            "update\r\ntype: %s\r\ndialog_id: \r\ncall_id: %s\r\ncseq: 1 INVITE\r\n"
            "from_uri: sip:alice@example.com\r\nto_uri: sip:bob@example.com\r\nfrom_tag: %s-ft\r\n"
            "to_tag: %s\r\nuser_agent: %s\r\nsignaling_ip: %s\r\nmedia: %s\r\n\r\n"
            % (kind, call_id, call_id, to_tag, user_agent, ip, media(ip, port)))
        parts = reply.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) == 0:
            raise Failed("update (%s) answered %r" % (kind, reply[:80]))

    def offer(self, call_id, port):
        self._update(call_id, "request", self.caller, port, "", "bench-caller")

    def answer(self, call_id, port):
        self._update(call_id, "reply", self.callee, port, call_id + "-tt", "bench-callee")

    def remove(self, call_id):
        reply = self._ask("remove\r\ncall_id: %s\r\nfrom_tag: %s-ft\r\nto_tag: %s-tt\r\n\r\n"
                          % (call_id, call_id, call_id))
        if reply != "removed":
            raise Failed("remove answered %r" % reply[:80])


class Rtpengine:
    """rtpengine's ng protocol on its UDP port: `COOKIE bencoded-dict`, answered `COOKIE bencoded-dict`."""

    def __init__(self, job):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(tuple(job["target"]))
        self.caller, self.callee = job["caller"], job["callee"]
        self.relay_ip = job["relay_ip"].encode()
        self.prefix = job["prefix"]
        self.low, self.high = job["ports"]
        self.n = 0
        self.checked = False

    def close(self):
        self.sock.close()

    def _ask(self, message: dict) -> bytes:
        """The answer's bencoded dictionary, checked for "result": "ok" without decoding it all
        (a `delete` answer carries kilobytes of statistics: decoding them in Python would cost
        the client more than the server)."""
        self.n += 1
        cookie = b"%s_%d" % (self.prefix.encode(), self.n)      # unique: rtpengine caches answers by cookie
        self.sock.send(cookie + b" " + bencode(message))
        while True:
            data = self.sock.recv(65536)
            head, _, body = data.partition(b" ")
            if head == cookie:          # anything else: a late answer to an earlier request
                break
        if not body.startswith(b"d") or b"6:result2:ok" not in body:
            raise Failed("%s answered %r" % (message["command"], body[:300]))
        return body

    def _rewritten(self, reply: bytes, port: int) -> None:
        """The SDP came back with the relay's address and a port it allocated."""
        at = reply.find(b"3:sdp")
        if at < 0:
            raise Failed("no SDP in %r" % reply[:300])
        colon = reply.index(b":", at + 5)
        answer = reply[colon + 1:colon + 1 + int(reply[at + 5:colon])]
        m = answer.find(b"m=audio ")
        allocated = int(answer[m + 8:answer.index(b" ", m + 8)]) if m >= 0 else 0
        if (b"c=IN IP4 " + self.relay_ip) not in answer or not self.low <= allocated <= self.high:
            raise Failed("SDP not rewritten to a port of rtpengine's range: %r" % answer[:300])

    def offer(self, call_id, port):
        self._rewritten(self._ask({"command": "offer", "call-id": call_id, "from-tag": call_id + "-ft",
                                   "sdp": sdp(self.caller, port)}), port)

    def answer(self, call_id, port):
        self._rewritten(self._ask({"command": "answer", "call-id": call_id, "from-tag": call_id + "-ft",
                                   "to-tag": call_id + "-tt", "sdp": sdp(self.callee, port)}), port)

    def remove(self, call_id):
        reply = self._ask({"command": "delete", "call-id": call_id, "from-tag": call_id + "-ft"})
        if not self.checked:         # once a job: the whole answer, decoded
            decoded = bdecode(reply)
            if decoded.get("result") != b"ok" or not decoded.get("tags"):
                raise Failed("delete answered %r" % reply[:300])
            self.checked = True


SERVERS = {"ours": Ours, "rtpengine": Rtpengine}


def run_job(job: dict) -> dict:
    """A job is a list of slices, run one after the other on their servers (the connections kept
    from one slice to the next): the answer is one result a slice."""
    clients = {}
    try:
        results = []
        for piece in job["slices"]:
            piece = dict(job, **piece)
            key = (piece["server"], json.dumps(piece["target"]))
            if key not in clients:
                clients[key] = SERVERS[piece["server"]](piece)
            if piece.get("mode") == "open" and "rate_of" in piece:
                # this client's share of the rate: `load` times what it did in slice `rate_of`
                # (a closed-loop slice just before), so the offered rate follows the machine's speed
                measured = results[piece["rate_of"]]
                done = 3 * measured["sessions"] / max(measured["wall"], 1e-6)
                piece["request_rate"] = max(piece["load"] * done, 1.0) * piece["clients"]
            result, clients[key] = run_slice(clients[key], piece)
            if piece.get("mode") == "open":
                result["request_rate"] = round(piece["request_rate"] / piece["clients"], 1)
            results.append(result)
    finally:
        for client in clients.values():
            client.close()
    return {"slices": results}


def run_slice(client, job: dict):
    """Sessions on `client` from job["start"] to job["end"]: closed loop (back to back) or open
    loop (every request at its scheduled time); the result and the client (a new one when the
    connection to ours broke)."""
    latencies = {kind: [] for kind in KINDS}
    late = {kind: [] for kind in KINDS}      # open loop: how late each went out (behind this client's last one)
    errors, failures = 0, []
    sessions = 0
    prefix = job["prefix"]
    port0 = job.get("port0", 4000)
    start, end = job["start"], job["end"]
    open_loop = job.get("mode") == "open"
    interval = job["clients"] / job["request_rate"] if open_loop else 0.0
    offset = job["index"] / job["request_rate"] if open_loop else 0.0
    monotonic, sleep = time.monotonic, time.sleep
    now = monotonic()
    if start > now:
        sleep(start - now)
    shifted = 0.0
    if open_loop and now > start + 0.001:
        # still busy with the slice before (its server fell behind): this slice's schedule begins now,
        # so that what the server before left undone is not charged to this one
        shifted = now - start
        start, end = now, end + shifted
    cpu0 = time.process_time()
    wall0 = monotonic()
    last = wall0
    k = 0                # requests scheduled so far (open loop)
    i = 0
    while True:
        call_id = "%s-%d" % (prefix, i)
        port = port0 + 2 * (i % 10000)
        steps = ((client.offer, (call_id, port)), (client.answer, (call_id, port + 20000)),
                 (client.remove, (call_id,)))
        if open_loop:
            if start + offset + k * interval >= end:
                break
        elif monotonic() >= end:
            break
        ok = True
        for kind, (step, args) in zip(KINDS, steps):
            if open_loop:
                scheduled = start + offset + k * interval
                k += 1
                now = monotonic()
                if scheduled > now:
                    sleep(scheduled - now)
                sent = monotonic()
            else:
                scheduled = sent = monotonic()
            try:
                step(*args)
            except (Failed, OSError, ValueError) as e:
                errors += 1
                if len(failures) < 5:
                    failures.append("%s %s: %s" % (kind, call_id, e))
                ok = False
                break
            last = monotonic()
            latencies[kind].append(int((last - scheduled) * 1e6))
            if open_loop:
                late[kind].append(int((sent - scheduled) * 1e6))
        if ok:
            sessions += 1
        elif job["server"] == "ours":
            # a dead connection stays dead; a bad answer does not stop the loop
            try:
                client.close()
            finally:
                client = SERVERS[job["server"]](job)
        i += 1
    cpu = time.process_time() - cpu0
    return ({"sessions": sessions, "errors": errors, "failures": failures, "latency_us": latencies, "late_us": late,
             "cpu": round(cpu, 4), "wall": round(last - wall0, 4), "first": wall0, "last": last,
             "shifted": round(shifted, 4)}, client)


def main() -> int:
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        if job.get("quit"):
            break
        try:
            answer = run_job(job)
        except Exception as e:              # reported, the parent decides
            answer = {"fatal": "%s: %s" % (type(e).__name__, e)}
        out.write(json.dumps(answer, separators=(",", ":")) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
