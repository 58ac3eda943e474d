"""media-sessions: the dispatcher's management interface from a shell.

    media-sessions [options] sessions | find TEXT | end CALL_ID | summary |
                             relay IP | drain IP | undrain IP | version | accounting

It reads the dispatcher's config.ini for where the management port listens
and whether it speaks TLS (then it presents a certificate of the CA from
[TLS] certs_path, the dispatcher's own by default, and checks the
dispatcher's against ca.pem), sends one command and prints the answer: a
table, or with --json the JSON lines as they came. Exit status: 0, 1 when
the dispatcher answered `error`, 2 when it could not be asked.
"""

import argparse
import json
import os
import socket
import ssl
import sys

from mediaproxy import __version__

DEFAULT_CONFIG_DIR = "/etc/mediaproxy"
TIMEOUT = 15.0


class ManagementError(Exception):
    """The dispatcher could not be asked (no connection, TLS refused, no answer)."""


def ask(address, command: str, tls_context=None, timeout: float = TIMEOUT) -> list:
    """One command over the management protocol (SPEC §5): the lines of its answer."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise ManagementError("cannot connect to %s:%d: %s" % (address[0], address[1], e.strerror or e)) from None
    try:
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock)
        sock.sendall(command.encode("utf-8") + b"\r\n")
        data = b""
        while not (data == b"\r\n" or data.endswith(b"\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                raise ManagementError("the dispatcher closed the connection without an answer")
            data += chunk
        sock.sendall(b"quit\r\n")
    except ssl.SSLError as e:
        raise ManagementError("TLS with %s:%d failed: %s" % (address[0], address[1], e.reason or e)) from None
    except OSError as e:
        raise ManagementError("%s:%d: %s" % (address[0], address[1], e.strerror or e)) from None
    finally:
        sock.close()
    return [line for line in data.decode("utf-8").split("\r\n") if line]


def tls_context(certs_path: str, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False          # the CA and its passports say who may serve, not a name
    context.load_verify_locations(os.path.join(certs_path, "ca.pem"))
    context.load_cert_chain(os.path.join(certs_path, name + ".crt"), os.path.join(certs_path, name + ".key"))
    return context


# What the answers look like on a terminal.

def _duration(seconds) -> str:
    seconds = int(seconds or 0)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def _stream_text(stream: dict) -> str:
    codec = stream.get("caller_codec") if stream.get("caller_codec") != "Unknown" else stream.get("callee_codec")
    return "%s %s %s %d/%d pkts" % (stream.get("media_type", "?"), codec or "Unknown", stream.get("status", "?"),
                                    stream.get("caller_packets", 0), stream.get("callee_packets", 0))


def table(rows, headings) -> str:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(heading)] + [len(row[i]) for row in rows]) for i, heading in enumerate(headings)]
    lines = ["  ".join(heading.ljust(width) for heading, width in zip(headings, widths)).rstrip()]
    lines.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    return "\n".join(lines)


def sessions_table(sessions) -> str:
    rows = [(s.get("call_id"), s.get("from_uri") or "-", s.get("to_uri") or "-", _duration(s.get("duration")),
             "; ".join(_stream_text(stream) for stream in s.get("streams") or []) or "-") for s in sessions]
    return table(rows, ("CALL-ID", "FROM", "TO", "DURATION", "STREAMS"))


def relays_table(relays) -> str:
    rows = []
    for r in relays:
        status = r.get("status", "?") + (" (draining)" if r.get("draining") else "")
        pairs = r.get("port_pairs") or {}
        ports = "%s/%s" % (pairs.get("used"), pairs.get("used", 0) + pairs.get("free", 0)) if pairs else "-"
        rows.append((r.get("ip"), status, r.get("version", "-"), r.get("session_count", "-"),
                     r.get("forwarding", "-"), ports, r.get("bps_relayed", "-")))
    return table(rows, ("RELAY", "STATUS", "VERSION", "SESSIONS", "FORWARDING", "PORT PAIRS", "BPS"))


def details_text(entry: dict) -> str:
    return "\n".join("%-26s %s" % (key + ":", json.dumps(value) if isinstance(value, (dict, list)) else value)
                     for key, value in entry.items())


def render(word: str, lines: list) -> str:
    values = [json.loads(line) for line in lines]
    if word in ("sessions", "find", "end"):
        return sessions_table(values)
    if word in ("summary", "drain", "undrain"):
        return relays_table(values)
    if word == "relay":
        return details_text(values[0])
    return "\n".join(json.dumps(value) for value in values)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="media-sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
                        help="the dispatcher's configuration (default %(default)s)")
    parser.add_argument("--address", metavar="HOST:PORT", help="the management port (default: from config.ini)")
    parser.add_argument("--tls", choices=("yes", "no"), help="speak TLS (default: from config.ini)")
    parser.add_argument("--certificate", default="dispatcher", metavar="NAME",
                        help="present NAME.crt/NAME.key from [TLS] certs_path (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the JSON lines of the answer")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait (default %(default)s)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("command", nargs="+", help="the command and its argument, e.g. find alice@example.com")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mediaproxy.configuration import ConfigError, load_configuration
    try:
        configuration = load_configuration(args.config_dir, "/run/mediaproxy")
    except ConfigError as e:
        print("media-sessions: %s" % e, file=sys.stderr)
        return 2
    host, port = configuration.dispatcher.listen_management
    if args.address:
        host, _, port_text = args.address.rpartition(":")
        port = int(port_text)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    use_tls = configuration.dispatcher.management_use_tls if args.tls is None else args.tls == "yes"
    word = args.command[0].lower()
    command = " ".join([word] + args.command[1:])
    try:
        context = tls_context(configuration.config_path(configuration.tls.certs_path), args.certificate) \
            if use_tls else None
        lines = ask((host, port), command, context, args.timeout)
    except (ManagementError, OSError, ssl.SSLError) as e:
        print("media-sessions: %s" % e, file=sys.stderr)
        return 2
    if lines == ["error"]:
        print("media-sessions: the dispatcher answered error to %r" % command, file=sys.stderr)
        return 1
    if args.json or word in ("version",):
        print("\n".join(lines))
    elif lines:
        print(render(word, lines))
    return 0
