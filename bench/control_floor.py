"""The floor of the control benchmark: the same two hops with no work.

    python -m bench.control_floor front CERTS SOCKET IP PORT    # the dispatcher's stand-in
    python -m bench.control_floor back CERTS IP PORT            # the relay's stand-in

A request of the proxy module goes from the client over a UNIX socket to the
front, which sends it over TLS (our certificates, Credentials contexts and
tlslayer over Twisted TCP, writes through mediaproxy.outgoing: as in the
daemons) to the back; the back answers each request with one line (`SEQ IP
PORT`, or `SEQ removed` for a remove) and the front writes that answer to
the client, except that it answers a remove at once and sends it on, as the
dispatcher does. No parsing beyond line ends, no sessions, no ports, no
logging: what Twisted, TLS and the process hops cost by themselves on this
machine. bench/control.py measures it in the same run
as ours and rtpengine (`control_rate_1_floor`, `control_rate_8_floor`), so
the figures show how much of our time is the daemons' own work.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def front(certs: str, socket_path: str, ip: str, port: int, reactor) -> None:
    from twisted.internet import protocol

    from mediaproxy import outgoing
    from mediaproxy.tls import Credentials
    from mediaproxy.tlslayer import TLSFactory

    backs = []

    class Back(protocol.Protocol):
        def connectionMade(self):
            backs.append(self)
            self.seq, self.waiting, self.buffer = 0, {}, b""
            print("back connected", flush=True)

        def send(self, request: bytes, answer) -> None:
            self.seq += 1
            self.waiting[self.seq] = answer
            self.transport.write(b"%d %s" % (self.seq, request))

        def dataReceived(self, data):
            *lines, self.buffer = (self.buffer + data).split(b"\r\n")
            for line in lines:
                seq, _, result = line.partition(b" ")
                self.waiting.pop(int(seq))(result + b"\r\n")

    class Proxy(protocol.Protocol):
        buffer = b""

        def answer(self, line: bytes) -> None:
            outgoing.write(self.transport, line)

        def dataReceived(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
            for request in requests:
                if request.startswith(b"remove"):        # as the dispatcher: answered, then sent on
                    self.answer(b"removed\r\n")
                    backs[-1].send(request + b"\r\n\r\n", lambda line: None)
                else:
                    backs[-1].send(request + b"\r\n\r\n", self.answer)

    credentials = Credentials(certs, "dispatcher")
    reactor.listenTCP(port, TLSFactory(protocol.Factory.forProtocol(Back), lambda: credentials.ssl_context(True), True),
                      interface=ip)
    reactor.listenUNIX(socket_path, protocol.Factory.forProtocol(Proxy))


def back(certs: str, ip: str, port: int, reactor) -> None:
    from twisted.internet import protocol

    from mediaproxy.tls import Credentials
    from mediaproxy.tlslayer import TLSFactory

    answer = b" %s 30000\r\n" % ip.encode()

    class Relay(protocol.Protocol):
        buffer = b""

        def dataReceived(self, data):
            *requests, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
            replies = []
            for request in requests:
                seq, _, command = request.partition(b"\r\n")[0].partition(b" ")
                replies.append(seq + (b" removed\r\n" if command == b"remove" else answer))
            self.transport.write(b"".join(replies))

    credentials = Credentials(certs, "relay")
    reactor.connectTCP(ip, port, TLSFactory(protocol.ClientFactory.forProtocol(Relay),
                                            lambda: credentials.ssl_context(False), False))


def main(argv) -> int:
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor

    from mediaproxy import outgoing
    outgoing.install(reactor)                # the daemons' control writes
    if argv[0] == "front":
        front(argv[1], argv[2], argv[3], int(argv[4]), reactor)
    else:
        back(argv[1], argv[2], int(argv[3]), reactor)
    print("listening" if argv[0] == "front" else "connecting", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
