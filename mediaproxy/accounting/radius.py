"""The RADIUS backend: an Accounting-Request (Acct-Status-Type Update) per
session, sent with pyrad to the server named in the proxy's RADIUS client
configuration (radiusclient format: acctserver, servers, dictionary,
radius_timeout, radius_retries, bindaddr), using the proxy's dictionary plus
ours for the attributes it lacks. Blocking: it runs in the backend's thread.
"""

import logging
import os

log = logging.getLogger("mediaproxy.accounting")

DEFAULT_USER = "mediaproxy@default"
MAX_STRING = 253            # octets in one RADIUS attribute
ACCT_STATUS_UPDATE = 3
ACCT_PORT = 1813


class RadiusConfigError(ValueError):
    pass


def parse_client_config(text: str) -> dict:
    """`key value` lines of a radiusclient(-ng) configuration file."""
    options = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        if not value:
            key, _, value = line.partition("\t")
        options[key.strip()] = value.strip()
    return options


def parse_servers(text: str) -> dict:
    """The `servers` file: `host secret` lines."""
    secrets = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        parts = line.split()
        if len(parts) >= 2:
            secrets[parts[0]] = parts[1]
    return secrets


def split_server(server: str):
    host, _, port = server.partition(":")
    return host, int(port) if port.isascii() and port.isdigit() else ACCT_PORT


def radius_attributes(statistics: dict) -> dict:
    """The attributes of SPEC §7 for one session's statistics."""
    streams = statistics.get("streams") or []
    relay_ip = streams[0]["caller_local"].rpartition(":")[0] if streams else None
    delays = [s["post_dial_delay"] for s in streams if s.get("post_dial_delay") is not None]
    if statistics.get("timed_out"):
        info = "timeout"
    elif statistics.get("all_streams_ice"):
        info = "ICE session"
    else:
        info = ""
    attributes = {
        # Update (Interim-Update in RFC 2866 dictionaries): sent as its number, which every dictionary knows
        "Acct-Status-Type": ACCT_STATUS_UPDATE,
        "User-Name": statistics.get("username") or DEFAULT_USER,
        "Acct-Session-Id": statistics["call_id"],
        "Acct-Session-Time": int(round(statistics.get("duration") or 0)),
        "Acct-Input-Octets": sum(s.get("caller_bytes", 0) for s in streams) & 0xFFFFFFFF,
        "Acct-Output-Octets": sum(s.get("callee_bytes", 0) for s in streams) & 0xFFFFFFFF,
        "Sip-From-Tag": statistics.get("from_tag") or "",
        "Sip-To-Tag": statistics.get("to_tag") or "",
        "Acct-Delay-Time": int(round(delays[0])) if delays else 0,
        "Sip-User-Agents": "%s + %s" % (statistics.get("caller_ua") or "Unknown",
                                        statistics.get("callee_ua") or "Unknown"),
        "Sip-Applications": ", ".join(sorted({s.get("media_type", "unknown").title() for s in streams})),
        "Media-Codecs": ", ".join("%s/%s" % (s.get("caller_codec"), s.get("callee_codec")) for s in streams),
        "Media-Info": info,
    }
    if relay_ip and ":" not in relay_ip:
        attributes["NAS-IP-Address"] = relay_ip      # the relay that carried the media
    if not info:
        del attributes["Media-Info"]                 # RFC 2865: no empty attributes
    for name, value in attributes.items():
        if isinstance(value, str) and len(value.encode()) > MAX_STRING:
            attributes[name] = value.encode()[:MAX_STRING].decode("utf-8", "ignore")
    return attributes


class RadiusBackend:
    name = "radius"
    permanent_errors = (ValueError, TypeError, KeyError)      # a record pyrad cannot encode

    def __init__(self, config, config_dir: str):
        from pyrad.dictionary import Dictionary
        path = config.config_file
        try:
            with open(path) as f:
                options = parse_client_config(f.read())
        except OSError as e:
            raise RadiusConfigError("cannot read the RADIUS client configuration %s: %s" % (path, e.strerror))
        server = options.get("acctserver")
        if not server:
            raise RadiusConfigError("%s names no acctserver" % path)
        self.host, self.port = split_server(server)
        servers_path = options.get("servers")
        try:
            with open(servers_path) as f:
                secrets = parse_servers(f.read())
        except (OSError, TypeError):
            raise RadiusConfigError("cannot read the RADIUS servers file %r named in %s" % (servers_path, path))
        secret = secrets.get(self.host) or secrets.get(server)
        if secret is None:
            raise RadiusConfigError("%s has no secret for %s" % (servers_path, self.host))
        dictionaries = [options[key] for key in ("dictionary",) if options.get(key)]
        ours = config.additional_dictionary
        dictionaries.append(ours if os.path.isabs(ours) else os.path.join(config_dir, ours))
        try:
            self.dictionary = Dictionary(*dictionaries)
        except Exception as e:
            raise RadiusConfigError("cannot load the RADIUS dictionaries %s: %s" % (", ".join(dictionaries), e))
        self.secret = secret.encode()
        self.timeout = int(options.get("radius_timeout", 10))
        self.retries = max(1, int(options.get("radius_retries", 3)))    # pyrad counts attempts
        bind = options.get("bindaddr", "*")
        self.bind_address = None if bind in ("*", "") else bind
        self.client = None

    def open(self) -> None:
        from pyrad.client import Client
        self.client = Client(server=self.host, acctport=self.port, secret=self.secret, dict=self.dictionary,
                             retries=self.retries, timeout=self.timeout)
        if self.bind_address:
            self.client.bind((self.bind_address, 0))

    def write(self, statistics: dict) -> None:
        if self.client is None:
            self.open()
        request = self.client.CreateAcctPacket()
        for attribute, value in radius_attributes(statistics).items():
            request[attribute] = value
        self.client.SendPacket(request)      # raises pyrad.client.Timeout when no server answers

    def close(self) -> None:
        self.client = None
