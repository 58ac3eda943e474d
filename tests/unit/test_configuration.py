"""config.ini: the defaults, every option's parser, and start-up errors that
name the section, the key and the value."""

import ipaddress
import re
import logging
import os

import pytest

from mediaproxy.configuration import ConfigError, load_configuration, parse_configuration


def parse(content, config_dir="/etc/mediaproxy", runtime_dir="/run/mediaproxy"):
    return parse_configuration(content, config_dir, runtime_dir)


def test_the_defaults():
    config = parse("")
    d, r = config.dispatcher, config.relay
    assert d.socket_path == "dispatcher.sock"
    assert d.listen == ("0.0.0.0", 25060) and d.listen_management == ("0.0.0.0", 25061)
    assert d.management_use_tls is True
    assert d.passport is None and d.management_passport is None
    assert (d.relay_timeout, d.relay_recover_interval) == (5, 60)
    assert d.cleanup_dead_relays_after == 43200
    assert d.accounting == () and d.log_level == logging.INFO
    assert r.dispatchers == () and r.relay_ip is None and r.advertised_ip is None
    assert r.port_range == (40000, 60000)
    assert (r.stream_timeout, r.on_hold_timeout) == (90, 7200)
    assert (r.keepalive_interval, r.dns_check_interval, r.reconnect_delay) == (10, 60, 10)
    assert r.routable_private_ranges == ()
    assert config.tls.certs_path == "tls" and config.tls.verify_interval == 300
    assert config.tls.handshake_timeout == 10 and d.management_idle_timeout == 300
    assert config.database.sessions_table == "media_sessions"
    assert (config.database.callid_column, config.database.fromtag_column, config.database.totag_column,
            config.database.info_column) == ("call_id", "from_tag", "to_tag", "info")


def test_paths_are_under_the_config_and_runtime_directories():
    config = parse("", "conf", "run")
    assert config.config_path("tls") == os.path.join(os.path.abspath("conf"), "tls")
    assert config.runtime_path("dispatcher.sock") == os.path.join(os.path.abspath("run"), "dispatcher.sock")
    assert config.runtime_path("/tmp/x.sock") == "/tmp/x.sock"


def test_a_full_dispatcher_section():
    config = parse("""
[Dispatcher]
socket_path = /run/mp/d.sock
listen = 192.0.2.1:26000
listen_management = [2001:db8::1]:26001
management_use_tls = no
passport = O:AG Projects, CN:relay*
relay_timeout = 2.5
relay_recover_interval = 30
accounting = database, radius
log_level = debug
""")
    d = config.dispatcher
    assert d.socket_path == "/run/mp/d.sock"
    assert d.listen == ("192.0.2.1", 26000)
    assert d.listen_management == ("2001:db8::1", 26001)
    assert d.management_use_tls is False
    assert d.passport == {"O": "AG Projects", "CN": "relay*"}
    assert (d.relay_timeout, d.relay_recover_interval) == (2.5, 30)
    assert d.accounting == ("database", "radius")
    assert d.log_level == logging.DEBUG


def test_a_full_relay_section():
    config = parse("""
[Relay]
dispatchers = proxy.example.com 192.0.2.1:25070, [2001:db8::5]:25060 sip.example.net
relay_ip = 198.51.100.1
advertised_ip = 203.0.113.1
port_range = 50000:50100
stream_timeout = 30
on_hold_timeout = 600
keepalive_interval = 5
passport = CN:dispatcher, EMAIL:*@example.com
routable_private_ranges = 10.0.0.0/8, 172.16.5.1/24
""")
    r = config.relay
    assert r.dispatchers == (("proxy.example.com", None), ("192.0.2.1", 25070), ("2001:db8::5", 25060),
                             ("sip.example.net", None))
    assert (r.relay_ip, r.advertised_ip) == ("198.51.100.1", "203.0.113.1")
    assert r.port_range == (50000, 50100)
    assert (r.stream_timeout, r.on_hold_timeout, r.keepalive_interval) == (30, 600, 5)
    assert r.passport == {"CN": "dispatcher", "emailAddress": "*@example.com"}
    assert r.routable_private_ranges == (ipaddress.ip_network("10.0.0.0/8"),
                                         ipaddress.ip_network("172.16.5.0/24"))


@pytest.mark.parametrize("text, value", [("yes", True), ("True", True), ("on", True), ("1", True),
                                         ("no", False), ("FALSE", False), ("off", False), ("0", False)])
def test_booleans(text, value):
    assert parse("[Dispatcher]\nmanagement_use_tls = %s\n" % text).dispatcher.management_use_tls is value


@pytest.mark.parametrize("text", ["", "none", "None"])
def test_no_passport(text):
    assert parse("[Relay]\npassport = %s\n" % text).relay.passport is None


def test_an_empty_ip_is_unset():
    assert parse("[Relay]\nrelay_ip =\n").relay.relay_ip is None


@pytest.mark.parametrize("section, address, exposed", [
    ("", ("0.0.0.0", 25061), False),                                       # TLS guards it
    ("management_use_tls = no", ("127.0.0.1", 25061), False),              # plain: loopback only
    ("management_use_tls = no\nlisten_management = :26001", ("0.0.0.0", 26001), True),
    ("management_use_tls = no\nlisten_management = 192.0.2.1", ("192.0.2.1", 25061), True),
    ("management_use_tls = no\nlisten_management = [::]:26001", ("::", 26001), True),
    ("management_use_tls = no\nlisten_management = 127.0.0.5:26001", ("127.0.0.5", 26001), False),
    ("management_use_tls = no\nlisten_management = [::1]:26001", ("::1", 26001), False),
    ("management_use_tls = yes\nlisten_management = 192.0.2.1", ("192.0.2.1", 25061), False),
])
def test_the_management_port_is_on_loopback_unless_tls_guards_it_or_an_address_is_given(section, address, exposed):
    d = parse("[Dispatcher]\n%s\n" % section).dispatcher
    assert d.listen_management == address
    assert d.management_exposed is exposed


def test_access_timeouts():
    config = parse("[Dispatcher]\nmanagement_idle_timeout = 60\n[TLS]\nhandshake_timeout = 2.5\n")
    assert config.dispatcher.management_idle_timeout == 60 and config.tls.handshake_timeout == 2.5


def test_a_listen_address_without_a_host_listens_everywhere():
    assert parse("[Dispatcher]\nlisten = :25070\n").dispatcher.listen == ("0.0.0.0", 25070)
    assert parse("[Dispatcher]\nlisten = 192.0.2.1\n").dispatcher.listen == ("192.0.2.1", 25060)


def test_inline_comments_and_option_case():
    config = parse("[Relay]\nPort_Range = 41000:42000 ; the firewall allows these\n")
    assert config.relay.port_range == (41000, 42000)


def test_unknown_options_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mediaproxy"):
        config = parse("[Relay]\nportrange = 1:2\n")
    assert config.relay.port_range == (40000, 60000)
    assert "[Relay] portrange" in caplog.text


def test_other_sections():
    config = parse("""
[TLS]
certs_path = /etc/mediaproxy/certs
verify_interval = 60
[OpenSIPS]
socket_path = /run/opensips/mi.sock
max_connections = 4
[Database]
dburi = sqlite:////var/lib/mp.db
sessions_table = calls
[Radius]
config_file = /etc/radiusclient/radiusclient.conf
""")
    assert config.tls.certs_path == "/etc/mediaproxy/certs" and config.tls.verify_interval == 60
    assert config.opensips.socket_path == "/run/opensips/mi.sock" and config.opensips.max_connections == 4
    assert config.database.dburi == "sqlite:////var/lib/mp.db" and config.database.sessions_table == "calls"
    assert config.radius.config_file == "/etc/radiusclient/radiusclient.conf"


@pytest.mark.parametrize("section, key, value", [
    ("Dispatcher", "management_use_tls", "maybe"),
    ("Dispatcher", "listen", "0.0.0.0:99999"),
    ("Dispatcher", "listen", "proxy.example.com:25060"),
    ("Dispatcher", "listen_management", "[::1]:port"),
    ("Dispatcher", "relay_timeout", "0"),
    ("Dispatcher", "relay_timeout", "-5"),
    ("Dispatcher", "relay_timeout", "soon"),
    ("Dispatcher", "relay_recover_interval", "nan"),
    ("Dispatcher", "management_idle_timeout", "0"),
    ("TLS", "handshake_timeout", "never"),
    ("Dispatcher", "accounting", "database, mysql"),
    ("Dispatcher", "log_level", "loud"),
    ("Dispatcher", "passport", "CN"),
    ("Dispatcher", "passport", "XX:relay"),
    ("Dispatcher", "passport", "CN:"),
    ("Relay", "dispatchers", ":25060"),
    ("Relay", "dispatchers", "proxy.example.com:0"),
    ("Relay", "relay_ip", "relay.example.com"),
    ("Relay", "advertised_ip", "300.1.1.1"),
    ("Relay", "port_range", "40001:50000"),
    ("Relay", "port_range", "50000:40000"),
    ("Relay", "port_range", "100:2000"),
    ("Relay", "port_range", "40000:70000"),
    ("Relay", "port_range", "40000-50000"),
    ("Relay", "routable_private_ranges", "10.0.0.0/33"),
    ("Relay", "stream_timeout", "1m"),
    ("TLS", "verify_interval", "0"),
    ("OpenSIPS", "max_connections", "1.5"),
    ("OpenSIPS", "max_connections", "0"),
])
def test_a_bad_value_names_section_key_and_value(section, key, value):
    with pytest.raises(ConfigError) as error:
        parse("[%s]\n%s = %s\n" % (section, key, value))
    message = str(error.value)
    assert "[%s]" % section in message and key in message and value in message


def test_a_file_that_is_not_ini_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be read"):
        parse("relay_ip = 1.2.3.4\n")
    with pytest.raises(ConfigError):
        parse("[Relay]\nrelay_ip = 1.2.3.4\nrelay_ip = 1.2.3.5\n")


def test_load_configuration_reads_config_ini(tmp_path):
    (tmp_path / "config.ini").write_text("[Relay]\nport_range = 50000:50010\n")
    config = load_configuration(str(tmp_path), str(tmp_path / "run"))
    assert config.relay.port_range == (50000, 50010)
    assert config.config_dir == str(tmp_path)


def test_a_missing_config_ini_means_the_defaults(tmp_path):
    assert load_configuration(str(tmp_path), str(tmp_path)).relay.port_range == (40000, 60000)


def test_an_unreadable_config_ini_is_a_config_error(tmp_path):
    (tmp_path / "config.ini").write_bytes(b"[Relay]\nrelay_ip = \xff\n")
    with pytest.raises(ConfigError, match="config.ini"):
        load_configuration(str(tmp_path), str(tmp_path))


def test_the_management_passport():
    config = parse("[Dispatcher]\nmanagement_passport = O:AG Projects, CN:admin*\n")
    assert config.dispatcher.management_passport == {"O": "AG Projects", "CN": "admin*"}


def test_an_infinite_number_names_section_key_and_value():
    with pytest.raises(ConfigError, match=r"\[Dispatcher\] relay_timeout = 'inf'"):
        parse("[Dispatcher]\nrelay_timeout = inf\n")


def test_accounting_spools_are_in_the_spool_dir_or_else_the_runtime_dir():
    assert parse("").spool_path("database") == "/run/mediaproxy/accounting/database"
    configuration = parse_configuration("", "/etc/mediaproxy", "/run/mediaproxy", "/var/spool/mediaproxy")
    assert configuration.spool_path("radius") == "/var/spool/mediaproxy/radius"


def test_socket_group_is_a_name_or_nothing():
    assert parse("").dispatcher.socket_group is None
    assert parse("[Dispatcher]\nsocket_group = kamailio\n").dispatcher.socket_group == "kamailio"
    assert parse("[Dispatcher]\nsocket_group =\n").dispatcher.socket_group is None


def test_config_ini_sample_lists_every_option_with_its_default():
    from dataclasses import fields
    from pathlib import Path
    from mediaproxy.configuration import SECTIONS
    sample = (Path(__file__).resolve().parents[2] / "config.ini.sample").read_text()
    # ";key = value" lines (no space after the ';') are the options, commented out.
    uncommented = "\n".join(line[1:] if line[:1] == ";" and line[1:2].isalpha() and " = " in line else line
                            for line in sample.splitlines())
    assert parse(uncommented) == parse("")
    listed = set(re.findall(r"^;(\w+) =", sample, re.M))
    documented = {f.name for cls in SECTIONS.values() for f in fields(cls)}
    assert documented - listed == set()
