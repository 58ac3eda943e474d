"""config.ini, read once into frozen dataclasses that are passed down.

Every option has a parser and a default here; a bad value stops start-up
with a ConfigError naming the section, the key and the value.
"""

import configparser
import ipaddress
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

from mediaproxy.protocol.framing import is_number

log = logging.getLogger("mediaproxy")

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL}
PASSPORT_ATTRIBUTES = {"O": "O", "OU": "OU", "CN": "CN", "C": "C", "L": "L", "ST": "ST",
                       "EMAIL": "emailAddress", "EMAILADDRESS": "emailAddress"}
ACCOUNTING_BACKENDS = frozenset(["database", "radius"])
MANAGEMENT_PORT = 25061
METRICS_PORT = 9580


class ConfigError(Exception):
    """A configuration value that cannot be used; the daemon does not start."""


# Value parsers: each takes the text and returns the value or raises ValueError(reason).

def parse_boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def parse_positive_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or not value > 0:
        raise ValueError("must be greater than 0")
    return int(value) if value == int(value) else value


def parse_positive_integer(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a whole number greater than 0")
    return value


def parse_ip_address(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    return str(ipaddress.ip_address(text))


def parse_relay_addresses(text: str) -> Optional[str]:
    """At most one IPv4 and one IPv6 address, comma separated: their canonical text, IPv4 first
    (a single address reads as itself), or None when empty. `addresses_by_version` reads it."""
    by_version = {}
    for item in text.replace(",", " ").split():
        address = ipaddress.ip_address(item)
        if address.version in by_version:
            raise ValueError("more than one IPv%d address (one of each family at most)" % address.version)
        by_version[address.version] = str(address)
    return ", ".join(by_version[version] for version in sorted(by_version)) or None


def addresses_by_version(text: Optional[str]) -> dict:
    """{4: IPv4 address, 6: IPv6 address} of a parse_relay_addresses value (either may be missing)."""
    by_version = {}
    for item in (text or "").replace(",", " ").split():
        by_version[ipaddress.ip_address(item).version] = item
    return by_version


def parse_listen_address(default_port: int):
    def parse(text: str):
        host, port = split_host_port(text.strip(), default_port)
        if port is None:
            raise ValueError("missing port")
        host = str(ipaddress.ip_address(host)) if host else "0.0.0.0"
        return host, port
    return parse


def parse_optional_listen_address(default_port: int):
    """parse_listen_address, or None (the port is off) for `none` or an empty value."""
    parse_address = parse_listen_address(default_port)

    def parse(text: str):
        if text.strip().lower() in ("", "none"):
            return None
        return parse_address(text)
    return parse


def split_host_port(text: str, default_port: Optional[int]):
    if text.startswith("["):                           # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port:
        if not is_number(port) or not 0 < int(port) < 65536:
            raise ValueError("bad port %r" % port)
        return host, int(port)
    return host, default_port


def parse_host_list(text: str) -> tuple:
    hosts = []
    for item in text.replace(",", " ").split():
        host, port = split_host_port(item, None)
        if not host:
            raise ValueError("empty host in %r" % item)
        hosts.append((host, port))
    return tuple(hosts)


def parse_port_range(text: str) -> tuple:
    start, sep, end = text.strip().partition(":")
    if not sep or not is_number(start) or not is_number(end):
        raise ValueError("expected start:end")
    start, end = int(start), int(end)
    if start % 2 or end % 2:
        raise ValueError("the bounds must be even numbers")
    if not 1024 <= start < end <= 65536:
        raise ValueError("expected 1024 <= start < end <= 65536")
    return start, end


def parse_passport(text: str) -> Optional[dict]:
    text = text.strip()
    if not text or text.lower() == "none":
        return None
    result = {}
    for item in text.split(","):
        name, sep, pattern = item.partition(":")
        attribute = PASSPORT_ATTRIBUTES.get(name.strip().upper())
        if not sep or attribute is None or not pattern.strip():
            raise ValueError("expected ATTRIBUTE:VALUE pairs with attributes among O, OU, CN, C, L, ST, EMAIL")
        result[attribute] = pattern.strip()
    return result


def parse_network_list(text: str) -> tuple:
    return tuple(ipaddress.ip_network(item, strict=False) for item in text.replace(",", " ").split())


def parse_accounting_list(text: str) -> tuple:
    backends = tuple(item.strip().lower() for item in text.replace(",", " ").split())
    unknown = [b for b in backends if b not in ACCOUNTING_BACKENDS]
    if unknown:
        raise ValueError("unknown backend %r (known: %s)" % (unknown[0], ", ".join(sorted(ACCOUNTING_BACKENDS))))
    return backends


def parse_choice(*choices):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of %s" % ", ".join(choices))
        return value
    return parse


def parse_mark(text: str) -> int:
    value = int(text.strip(), 0)
    if not 0 < value < 2 ** 32:
        raise ValueError("expected a number from 1 to 0xffffffff")
    return value


def parse_log_level(text: str) -> int:
    try:
        return LOG_LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected one of %s" % ", ".join(LOG_LEVELS)) from None


def parse_text(value: str) -> str:
    return value.strip()


def parse_optional_text(value: str) -> Optional[str]:
    return value.strip() or None


def option(parser, default):
    """A dataclass field default that remembers how the option is parsed."""
    from dataclasses import field
    return field(default=default, metadata={"parser": parser})


@dataclass(frozen=True)
class DispatcherConfig:
    socket_path: str = option(parse_text, "dispatcher.sock")
    socket_group: Optional[str] = option(parse_optional_text, None)
    listen: tuple = option(parse_listen_address(25060), ("0.0.0.0", 25060))
    listen_management: Optional[tuple] = option(parse_listen_address(MANAGEMENT_PORT), None)
    management_use_tls: bool = option(parse_boolean, True)
    management_idle_timeout: float = option(parse_positive_number, 300)
    passport: Optional[dict] = option(parse_passport, None)
    management_passport: Optional[dict] = option(parse_passport, None)
    listen_metrics: Optional[tuple] = option(parse_optional_listen_address(METRICS_PORT), ("127.0.0.1", METRICS_PORT))
    relay_timeout: float = option(parse_positive_number, 5)
    relay_recover_interval: float = option(parse_positive_number, 60)
    cleanup_dead_relays_after: float = option(parse_positive_number, 43200)
    cleanup_expired_sessions_after: float = option(parse_positive_number, 86400)
    accounting: tuple = option(parse_accounting_list, ())
    log_level: int = option(parse_log_level, logging.INFO)

    def __post_init__(self):
        # Unset, the management port listens everywhere only when TLS guards it.
        if self.listen_management is None:
            host = "0.0.0.0" if self.management_use_tls else "127.0.0.1"
            object.__setattr__(self, "listen_management", (host, MANAGEMENT_PORT))

    @property
    def management_exposed(self) -> bool:
        """Plain-TCP management on an address other hosts may reach."""
        return not self.management_use_tls and not ipaddress.ip_address(self.listen_management[0]).is_loopback

    @property
    def metrics_exposed(self) -> bool:
        """The HTTP port (metrics, status page: every call) on an address other hosts may reach."""
        return self.listen_metrics is not None and not ipaddress.ip_address(self.listen_metrics[0]).is_loopback


@dataclass(frozen=True)
class RelayConfig:
    dispatchers: tuple = option(parse_host_list, ())
    relay_ip: Optional[str] = option(parse_relay_addresses, None)          # see relay_addresses
    advertised_ip: Optional[str] = option(parse_relay_addresses, None)
    port_range: tuple = option(parse_port_range, (40000, 60000))
    stream_timeout: float = option(parse_positive_number, 90)
    on_hold_timeout: float = option(parse_positive_number, 7200)
    traffic_sampling_period: float = option(parse_positive_number, 15)
    dns_check_interval: float = option(parse_positive_number, 60)
    keepalive_interval: float = option(parse_positive_number, 10)
    reconnect_delay: float = option(parse_positive_number, 10)
    passport: Optional[dict] = option(parse_passport, None)
    verify_dispatcher_names: bool = option(parse_boolean, False)
    routable_private_ranges: tuple = option(parse_network_list, ())
    strict_source: bool = option(parse_boolean, True)
    relatch_after: float = option(parse_positive_number, 2)
    kernel_forwarding: str = option(parse_choice("auto", "yes", "no"), "auto")
    conntrack_mark: int = option(parse_mark, 0x4D50)
    keep_calls_on_restart: bool = option(parse_boolean, True)
    log_level: int = option(parse_log_level, logging.INFO)

    @property
    def relay_addresses(self) -> dict:
        """The configured relay addresses by IP version ({} when unset: the relay finds them)."""
        return addresses_by_version(self.relay_ip)

    @property
    def advertised_addresses(self) -> dict:
        return addresses_by_version(self.advertised_ip)


@dataclass(frozen=True)
class TLSConfig:
    certs_path: str = option(parse_text, "tls")
    verify_interval: float = option(parse_positive_number, 300)
    handshake_timeout: float = option(parse_positive_number, 10)


@dataclass(frozen=True)
class OpenSIPSConfig:
    socket_path: str = option(parse_text, "/run/opensips/socket")
    proxy: str = option(parse_choice("auto", "opensips", "kamailio"), "auto")
    max_connections: int = option(parse_positive_integer, 10)


@dataclass(frozen=True)
class DatabaseConfig:
    dburi: str = option(parse_text, "")
    sessions_table: str = option(parse_text, "media_sessions")
    callid_column: str = option(parse_text, "call_id")
    fromtag_column: str = option(parse_text, "from_tag")
    totag_column: str = option(parse_text, "to_tag")
    info_column: str = option(parse_text, "info")


@dataclass(frozen=True)
class RadiusConfig:
    config_file: str = option(parse_text, "/etc/opensips/radius/client.conf")
    additional_dictionary: str = option(parse_text, "radius/dictionary")


SECTIONS = {"Dispatcher": DispatcherConfig, "Relay": RelayConfig, "TLS": TLSConfig,
            "OpenSIPS": OpenSIPSConfig, "Database": DatabaseConfig, "Radius": RadiusConfig}


@dataclass(frozen=True)
class Configuration:
    config_dir: str
    runtime_dir: str
    dispatcher: DispatcherConfig
    relay: RelayConfig
    tls: TLSConfig
    opensips: OpenSIPSConfig
    database: DatabaseConfig
    radius: RadiusConfig
    spool_dir: Optional[str] = None

    def config_path(self, path: str) -> str:
        return os.path.join(self.config_dir, os.path.expanduser(path))

    def runtime_path(self, path: str) -> str:
        return os.path.join(self.runtime_dir, os.path.expanduser(path))

    def spool_path(self, name: str) -> str:
        """Where the records for the accounting back-end ``name`` wait."""
        return os.path.join(self.spool_dir or os.path.join(self.runtime_dir, "accounting"), name)


def _section(parser: configparser.ConfigParser, name: str, cls):
    values = {}
    known = {f.name: f for f in fields(cls)}
    if parser.has_section(name):
        for key, raw in parser.items(name):
            f = known.get(key)
            if f is None:
                log.warning("config.ini: [%s] %s is not a known option and is ignored", name, key)
                continue
            try:
                values[key] = f.metadata["parser"](raw)
            except ValueError as e:
                raise ConfigError("config.ini: [%s] %s = %r: %s" % (name, key, raw, e)) from None
    return cls(**values)


def parse_configuration(content: str, config_dir: str, runtime_dir: str,
                        spool_dir: Optional[str] = None) -> Configuration:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    try:
        parser.read_string(content, source="config.ini")
    except configparser.Error as e:
        raise ConfigError("config.ini cannot be read: %s" % e) from None
    for name in parser.sections():
        if name not in SECTIONS:
            log.warning("config.ini: section [%s] is not known and is ignored (sections: %s)",
                        name, ", ".join(SECTIONS))
    sections = {name.lower(): _section(parser, name, cls) for name, cls in SECTIONS.items()}
    return Configuration(config_dir=os.path.abspath(config_dir), runtime_dir=os.path.abspath(runtime_dir),
                         spool_dir=os.path.abspath(spool_dir) if spool_dir else None, **sections)


def load_configuration(config_dir: str, runtime_dir: str, spool_dir: Optional[str] = None) -> Configuration:
    path = os.path.join(config_dir, "config.ini")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        log.warning("%s does not exist: using the defaults", path)
        content = ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read %s: %s" % (path, e)) from None
    return parse_configuration(content, config_dir, runtime_dir, spool_dir)
