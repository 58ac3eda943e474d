"""How a relay turns its `dispatchers` setting into addresses to connect to."""

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError

from mediaproxy.relay.dispatchers import DISPATCHER_PORT, resolve_dispatcher


class FakeResolver:
    """Answers SRV and A lookups from dictionaries, as twisted.names does."""

    def __init__(self, srv=None, hosts=None):
        self.srv = srv or {}
        self.hosts = hosts or {}
        self.srv_queries = []

    def lookupService(self, name):
        self.srv_queries.append(name)
        if name not in self.srv:
            return defer.fail(DNSNameError(name))
        answers = [dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(10, 10, port, target))
                   for target, port in self.srv[name]]
        return defer.succeed((answers, [], []))

    def getHostByName(self, name):
        if name not in self.hosts:
            return defer.fail(DNSNameError(name))
        return defer.succeed(self.hosts[name])


def resolved(host, port, resolver):
    result = []
    resolve_dispatcher(host, port, resolver).addCallback(result.append)
    assert result, "resolution did not finish"
    return result[0]


def test_an_ip_is_used_as_it_is_without_any_lookup():
    resolver = FakeResolver()
    assert resolved("198.51.100.7", None, resolver) == {("198.51.100.7", DISPATCHER_PORT): "198.51.100.7"}
    assert resolved("198.51.100.7", 9999, resolver) == {("198.51.100.7", 9999): "198.51.100.7"}
    assert resolver.srv_queries == []


def test_a_domain_with_sip_srv_records_gives_every_proxy_on_the_dispatcher_port():
    resolver = FakeResolver(srv={"_sip._udp.example.com": [("proxy1.example.com", 5060),
                                                            ("proxy2.example.com", 5060)]},
                            hosts={"proxy1.example.com": "198.51.100.1", "proxy2.example.com": "198.51.100.2"})
    # each known by its own name: that is what its certificate is checked against
    assert resolved("example.com", None, resolver) == {("198.51.100.1", DISPATCHER_PORT): "proxy1.example.com",
                                                       ("198.51.100.2", DISPATCHER_PORT): "proxy2.example.com"}


def test_a_hostname_without_srv_records_is_looked_up_itself():
    resolver = FakeResolver(hosts={"dispatcher.example.com": "198.51.100.9"})
    assert resolved("dispatcher.example.com", None, resolver) == {
        ("198.51.100.9", DISPATCHER_PORT): "dispatcher.example.com"}


def test_a_hostname_with_a_port_skips_srv():
    resolver = FakeResolver(srv={"_sip._udp.example.com": [("proxy1.example.com", 5060)]},
                            hosts={"example.com": "198.51.100.3", "proxy1.example.com": "198.51.100.1"})
    assert resolved("example.com", 25070, resolver) == {("198.51.100.3", 25070): "example.com"}
    assert resolver.srv_queries == []


def test_a_name_that_does_not_resolve_gives_no_address_and_no_error():
    assert resolved("nowhere.invalid", None, FakeResolver()) == {}
