"""TLS over a Twisted TCP connection, done by the standard library's ssl module.

The relay link carries every proxy request twice (to the relay and back), a
few hundred bytes each way. Twisted's own TLS layer drives pyOpenSSL through
cffi and Python code for each record: on the control benchmark that was a
third of what the two hops cost. Here the record work is one call into
CPython's C module per direction (ssl.SSLObject over two MemoryBIOs), and
the TCP connection stays Twisted's (connect, listen, buffers, producers).

TLSProtocol wraps the application's protocol and is its transport: the
protocol gets connectionMade at TCP connect, handshakeCompleted (Twisted's
IHandshakeListener) once the peer is verified by OpenSSL, dataReceived with
plaintext, and connectionLost: when TLS ended it (a failed handshake, an
alert from the peer), with the ssl.SSLError as its reason (an SSLCertVerificationError carries OpenSSL's verify code and,
as `peer_certificate`, the certificate it rejected: see tls.py).
"""

import ssl

from OpenSSL import crypto
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from mediaproxy import outgoing
from mediaproxy.tls import handshake_ended, handshake_started

READ_SIZE = 65536


class TLSProtocol(ProtocolWrapper):
    """One TLS connection: ciphertext from and to self.transport, plaintext to and from the wrapped protocol."""

    handshake_done = False
    error = None                    # the ssl.SSLError that ended the connection, if one did
    _peer_certificate = None
    _unsealed = None                # plaintext written in this turn, encrypted before the turn's writes go

    def __init__(self, factory, wrapped):
        super().__init__(factory, wrapped)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._context = factory.context()
        handshake_started(self._context)
        self._tls = self._context.wrap_bio(self._incoming, self._outgoing, server_side=factory.server_side)
        self._held = []          # written before the handshake ended

    def _handshake_over(self) -> None:
        if self._context is not None:
            handshake_ended(self._context)
            self._context = None

    def makeConnection(self, transport):
        super().makeConnection(transport)
        if not self.factory.server_side:
            self._handshake()            # the ClientHello

    # Ciphertext in.

    def dataReceived(self, data):
        self._incoming.write(data)
        if not self.handshake_done and not self._handshake():
            return
        tls, incoming = self._tls, self._incoming
        deliver = self.wrappedProtocol.dataReceived
        while True:
            try:
                plaintext = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:             # a record not yet whole
                break
            except ssl.SSLError as e:                # an alert, or a record that does not decrypt
                self.error = e
                self.abortConnection()
                return
            if not plaintext:                        # the peer's close_notify
                self.loseConnection()
                return
            deliver(plaintext)
            if self.disconnecting:
                return
            if not incoming.pending and not tls.pending():
                break                                # all read: no SSLWantReadError to raise and catch
        if self._outgoing.pending:           # e.g. a key update's answer
            self._send_pending()

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_pending()
            return False
        except ssl.SSLError as e:
            self._handshake_over()
            if isinstance(e, ssl.SSLCertVerificationError):
                der = getattr(self._tls, "peer_certificate_der", None)
                e.peer_certificate = crypto.load_certificate(crypto.FILETYPE_ASN1, der) if der else None
            self.error = e
            self._send_pending()                    # the alert, so the peer learns why
            outgoing.flush(self.transport)
            self.transport.loseConnection()
            return False
        self.handshake_done = True
        self._handshake_over()
        self._send_pending()
        held, self._held = self._held, []
        for data in held:
            self.write(data)
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        return not self.disconnecting

    def _send_pending(self) -> None:
        if self._outgoing.pending:
            outgoing.write(self.transport, self._outgoing.read())

    # Plaintext out: the wrapped protocol's transport.

    def write(self, data):
        if not self.handshake_done:
            self._held.append(data)
            return
        if self.disconnecting:
            return
        if self._unsealed is not None:
            self._unsealed.append(data)
        elif outgoing.before_push(self._seal):
            # what the turn writes goes out as one record: one encryption (and one decryption at
            # the other end) for the replies of a busy turn instead of one each
            self._unsealed = [data]
        else:
            self._encrypt(data)

    def _seal(self):
        unsealed, self._unsealed = self._unsealed, None
        if unsealed and not self.disconnecting:
            self._encrypt(b"".join(unsealed))

    def _encrypt(self, data):
        self._tls.write(data)
        outgoing.write(self.transport, self._outgoing.read())

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        if self.disconnecting:
            return
        self._seal()
        self.disconnecting = True
        if self.handshake_done:
            try:
                self._tls.unwrap()                   # our close_notify; the peer's is not awaited
            except ssl.SSLError:
                pass
            self._send_pending()
        outgoing.flush(self.transport)
        self.transport.loseConnection()

    def abortConnection(self):
        self.disconnecting = True
        self.transport.abortConnection()

    def getPeerCertificate(self):
        """The peer's certificate as a pyOpenSSL X509 (what tls.py's checks take), or None."""
        if self._peer_certificate is None and self.handshake_done:
            der = self._tls.getpeercert(binary_form=True)
            if der:
                self._peer_certificate = crypto.load_certificate(crypto.FILETYPE_ASN1, der)
        return self._peer_certificate

    def getHandle(self):
        return self._tls

    def connectionLost(self, reason):
        self._handshake_over()
        if self.error is not None:
            reason = Failure(self.error)                # why, rather than how, it ended
        super().connectionLost(reason)


class TLSFactory(WrappingFactory):
    """Wraps `factory`'s protocols in TLS; `context` is called for each connection (a CRL may change)."""

    protocol = TLSProtocol

    def __init__(self, factory, context, server_side: bool):
        super().__init__(factory)
        self.context = context
        self.server_side = server_side

    def registerProtocol(self, p):
        pass                                     # WrappingFactory's bookkeeping: nobody asks

    def unregisterProtocol(self, p):
        pass
