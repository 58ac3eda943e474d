"""The relay's iptables rules, through python-iptables.

- Hooks: conntrack and NAT do nothing in a network namespace until a rule
  needs them (FIELD-NOTES 1). The relay makes sure the nat table exists and
  keeps one stateful rule in a chain of its own, MEDIAPROXY, which nothing
  jumps to: loading it is what switches conntrack on.
- Inhibitor: while a sub-stream's old conntrack entries are replaced by the
  NAT entry, its packets must not create a wrong entry (FIELD-NOTES 6). One
  NOTRACK rule in raw PREROUTING matches the UDP flows of an ipset (source
  address, destination port, destination address); a flow is a member of
  the set exactly while its entries are swapped, added and removed by
  netlink in the same batch as the swap. (A python-iptables rule per flow
  costs about 2 ms to add and remove: 250 hand-overs a second at most.)

- Traffic counter: one rule in mangle FORWARD, matching the connections
  with our mark and jumping nowhere, counts everything the kernel relays for
  us; reading it is how bps_relayed is sampled at any number of streams.

Every rule carries a comment naming the relay's conntrack mark, so rules
left by a relay that was killed are found and removed at the next start.

An Iptables is the rules of one IP version: iptables for IPv4, ip6tables
(python-iptables' Table6 and Rule6) for IPv6, the same rules in each.
"""

import logging

log = logging.getLogger("mediaproxy.relay")

HOOK_CHAIN = "MEDIAPROXY"


class IptablesError(Exception):
    pass


def _iptc():
    try:
        import iptc
    except Exception as e:      # the module loads libxtables at import time
        raise IptablesError("python-iptables cannot be used: %s" % e) from None
    return iptc


class Iptables:
    def __init__(self, mark: int, ip_version: int = 4):
        self.iptc = _iptc()
        self.mark = mark
        self.ip_version = ip_version
        self.comment = "mediaproxy %#x" % mark
        if ip_version == 6:
            self._table, self._rule = self.iptc.Table6, self.iptc.Rule6
        else:
            self._table, self._rule = self.iptc.Table, self.iptc.Rule
        self.command = "ip6tables" if ip_version == 6 else "iptables"

    def _comment_of(self, rule):
        for match in rule.matches:
            if match.name == "comment":
                return match.comment
        return None

    def enable_conntrack_hooks(self) -> None:
        """The nat table, and a stateful rule in our own chain (referenced by nothing)."""
        iptc = self.iptc
        try:
            self._table(self._table.NAT).refresh()
            table = self._table(self._table.FILTER)
            table.refresh()
            if not table.is_chain(HOOK_CHAIN):
                table.create_chain(HOOK_CHAIN)
            chain = iptc.Chain(table, HOOK_CHAIN)
            if not any(self._comment_of(rule) == self.comment for rule in chain.rules):
                rule = self._rule()
                match = rule.create_match("conntrack")
                match.ctstate = "NEW"
                rule.create_match("comment").comment = self.comment
                rule.create_target("RETURN")
                chain.append_rule(rule)
        except iptc.IPTCError as e:
            raise IptablesError("cannot set up the %s hooks: %s" % (self.command, e)) from None

    def ensure_traffic_counter(self) -> None:
        iptc = self.iptc
        try:
            table = self._table(self._table.MANGLE)
            table.refresh()
            chain = iptc.Chain(table, "FORWARD")
            ours = [rule for rule in chain.rules if self._comment_of(rule) == self.comment]
            if len(ours) == 1:
                return
            rule = self._rule()
            rule.create_match("connmark").mark = "%#x" % self.mark
            rule.create_match("comment").comment = self.comment
            rule.create_target("")
            self._commit(table, lambda: ([chain.delete_rule(old) for old in ours], chain.append_rule(rule)))
        except iptc.IPTCError as e:
            raise IptablesError("cannot set up the %s traffic counter: %s" % (self.command, e)) from None

    def kernel_traffic(self):
        """(packets, bytes) the kernel relayed on our connections, as counted by the rule."""
        iptc = self.iptc
        table = self._table(self._table.MANGLE)
        table.refresh()
        for rule in iptc.Chain(table, "FORWARD").rules:
            if self._comment_of(rule) == self.comment:
                return rule.get_counters()
        raise IptablesError("the %s traffic counter rule is gone" % self.command)

    def remove_stale_inhibitors(self) -> int:
        """Inhibitor rules of ours left by an earlier run (e.g. after SIGKILL), before ours are added."""
        iptc = self.iptc
        table = self._table(self._table.RAW)
        table.refresh()
        chain = iptc.Chain(table, "PREROUTING")
        stale = [rule for rule in chain.rules if self._comment_of(rule) == self.comment
                 and not any(match.name == "set" for match in rule.matches)]
        if stale:
            self._commit(table, lambda: [chain.delete_rule(rule) for rule in stale])
        return len(stale)

    def ensure_inhibitor_rule(self, set_name: str) -> None:
        """The NOTRACK rule of the inhibitor set, first in raw PREROUTING."""
        iptc = self.iptc
        try:
            table = self._table(self._table.RAW)
            table.refresh()
            chain = iptc.Chain(table, "PREROUTING")
            if any(self._comment_of(rule) == self.comment and any(m.name == "set" for m in rule.matches)
                   for rule in chain.rules):
                return
            rule = self._rule()
            rule.protocol = "udp"
            rule.create_match("set").match_set = [set_name, "src,dst,dst"]
            rule.create_match("comment").comment = self.comment
            rule.create_target("CT").notrack = ""
            chain.insert_rule(rule)
        except iptc.IPTCError as e:
            raise IptablesError("cannot add the %s NOTRACK inhibitor rule: %s" % (self.command, e)) from None

    def _commit(self, table, change) -> None:
        table.autocommit = False
        try:
            table.refresh()
            change()
            table.commit()
        finally:
            table.autocommit = True
