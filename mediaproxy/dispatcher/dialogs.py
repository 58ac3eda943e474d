"""Ending the SIP dialog of a call whose media died, through the proxy's
management interface: JSON-RPC 2.0 over the proxy's datagram socket.

- OpenSIPS (its MI datagram socket): `dlg_end_dlg` with the numeric dialog id.
- Kamailio (jsonrpcs with a datagram transport): `dlg.end_dlg` with h_entry
  and h_id as two numbers (as strings Kamailio answers "Dialog not found").

With `[OpenSIPS] proxy = auto` the form of the dialog id decides: Kamailio's
mediaproxy module sends `h_entry:h_id`, OpenSIPS a single number.
"""

import json
import logging
import os

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

log = logging.getLogger("mediaproxy.dispatcher")

OPENSIPS, KAMAILIO, AUTO = "opensips", "kamailio", "auto"
RPC_TIMEOUT = 3.0


class DialogError(Exception):
    pass


def end_dialog_request(dialog_id: str, proxy: str, request_id: int) -> bytes:
    """The JSON-RPC request that ends `dialog_id` on that kind of proxy."""
    entry, colon, number = dialog_id.partition(":")
    if proxy == AUTO:
        proxy = KAMAILIO if colon else OPENSIPS
    if proxy == KAMAILIO:
        if not (entry.isascii() and entry.isdigit() and number.isascii() and number.isdigit()):
            raise DialogError("%r is not a Kamailio dialog id (h_entry:h_id)" % dialog_id)
        method, params = "dlg.end_dlg", [int(entry), int(number)]
    else:
        method, params = "dlg_end_dlg", [dialog_id]
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}).encode()


def parse_response(data: bytes):
    """(request id, error message or None) of a JSON-RPC response."""
    try:
        response = json.loads(data)
    except ValueError:
        raise DialogError("the proxy's answer is not JSON") from None
    if not isinstance(response, dict):
        raise DialogError("the proxy's answer is not a JSON-RPC response")
    error = response.get("error")
    if error is not None:
        message = error.get("message", error) if isinstance(error, dict) else error
        return response.get("id"), str(message)
    return response.get("id"), None


class DialogTerminator(DatagramProtocol):
    """Sends end-dialog requests from our own datagram socket and matches the answers by id."""

    def __init__(self, proxy_socket: str, own_socket: str, proxy: str, reactor, timeout: float = RPC_TIMEOUT):
        self.proxy_socket = proxy_socket
        self.own_socket = own_socket
        self.proxy = proxy
        self.reactor = reactor
        self.timeout = timeout
        self.pending = {}
        self._next_id = 0
        self._port = None

    def start(self) -> None:
        try:
            os.unlink(self.own_socket)
        except FileNotFoundError:
            pass
        # the proxy answers to this socket: its group may write, others not
        self._port = self.reactor.listenUNIXDatagram(self.own_socket, self, mode=0o660)

    def stop(self) -> None:
        if self._port is not None:
            self._port.stopListening()
            self._port = None
        for deferred, timer in self.pending.values():
            timer.cancel()
        self.pending.clear()

    def end_dialog(self, dialog_id: str, call_id: str) -> defer.Deferred:
        """Ask the proxy to end the dialog; the Deferred fires True when it did (never fails)."""
        self._next_id += 1
        request_id = self._next_id
        try:
            request = end_dialog_request(dialog_id, self.proxy, request_id)
            if self._port is None:
                raise DialogError("the dispatcher's datagram socket is not open")
            self._port.write(request, self.proxy_socket)
        except (DialogError, OSError) as e:
            log.error("session %s: cannot ask the proxy to end dialog %s: %s", call_id, dialog_id, e)
            return defer.succeed(False)
        deferred = defer.Deferred()
        timer = self.reactor.callLater(self.timeout, self._timed_out, request_id, dialog_id, call_id)
        self.pending[request_id] = (deferred, timer)
        deferred.addCallback(self._answered, dialog_id, call_id)
        return deferred

    def datagramReceived(self, data, address):
        try:
            request_id, error = parse_response(data)
        except DialogError as e:
            log.warning("%s", e)
            return
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return
        deferred, timer = entry
        timer.cancel()
        deferred.callback(error)

    def _timed_out(self, request_id, dialog_id, call_id):
        deferred, _ = self.pending.pop(request_id)
        log.error("session %s: the proxy did not answer the request to end dialog %s within %s s (socket %s)",
                  call_id, dialog_id, self.timeout, self.proxy_socket)
        deferred.callback(False)

    @staticmethod
    def _answered(error, dialog_id, call_id):
        if error is False:
            return False
        if error is None:
            log.info("session %s: the proxy ended dialog %s", call_id, dialog_id)
            return True
        log.warning("session %s: the proxy could not end dialog %s: %s", call_id, dialog_id, error)
        return False
