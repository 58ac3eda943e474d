"""The reference of the user-space benchmark: a minimal Twisted UDP forwarder.

    python -m bench.userspace_forwarder --ip RELAY_IP --pairs N --a-port A0 --b-port B0
        --caller IP --caller-port X0 --callee IP --callee-port Y0 [--ready FILE]

For i in 0..N-1: a DatagramProtocol on RELAY_IP:A0+i sends every datagram it
gets to the callee (Y0+i) out of RELAY_IP:B0+i, and the one on B0+i sends
what it gets back to the caller (X0+i) out of A0+i. Nothing else: no
latching, no counters, no parsing. It runs in the default reactor (epoll on
Linux) under the same Python as media-relay, so that what it costs a packet
is what Twisted and the kernel cost, which any user-space relay pays too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from twisted.internet.protocol import DatagramProtocol


class Side(DatagramProtocol):
    def __init__(self, destination):
        self.destination = destination
        self.other = None            # the Side whose port the datagrams leave from

    def datagramReceived(self, data, address):
        self.other.transport.write(data, self.destination)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.userspace_forwarder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--a-port", type=int, required=True)
    parser.add_argument("--b-port", type=int, required=True)
    parser.add_argument("--caller", required=True)
    parser.add_argument("--caller-port", type=int, required=True)
    parser.add_argument("--callee", required=True)
    parser.add_argument("--callee-port", type=int, required=True)
    parser.add_argument("--ready", help="file that gets READY once every port is bound")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    for i in range(args.pairs):
        a = Side((args.callee, args.callee_port + i))
        b = Side((args.caller, args.caller_port + i))
        a.other, b.other = b, a
        reactor.listenUDP(args.a_port + i, a, interface=args.ip)
        reactor.listenUDP(args.b_port + i, b, interface=args.ip)
    if args.ready:
        with open(args.ready, "w") as ready:
            ready.write("READY %d\n" % os.getpid())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
