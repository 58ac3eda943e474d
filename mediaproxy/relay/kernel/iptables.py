"""The relay's iptables rules, through python-iptables.

- Hooks: conntrack and NAT do nothing in a network namespace until a rule
  needs them (FIELD-NOTES 1). The relay makes sure the nat table exists and
  keeps one stateful rule in a chain of its own, MEDIAPROXY, which nothing
  jumps to: loading it is what switches conntrack on.
- Inhibitors: while a sub-stream's old conntrack entries are replaced by
  the NAT entry, NOTRACK rules in raw PREROUTING (exact 5-tuple) keep its
  packets from creating a wrong entry meanwhile (FIELD-NOTES 6). They are
  added and removed for a whole batch of hand-overs in one commit each.

- Traffic counter: one rule in mangle FORWARD, matching the connections
  with our mark and jumping nowhere, counts everything the kernel relays for
  us; reading it is how bps_relayed is sampled at any number of streams.

Every rule carries a comment naming the relay's conntrack mark, so rules
left by a relay that was killed are found and removed at the next start.
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
    def __init__(self, mark: int):
        self.iptc = _iptc()
        self.mark = mark
        self.comment = "mediaproxy %#x" % mark

    def _comment_of(self, rule):
        for match in rule.matches:
            if match.name == "comment":
                return match.comment
        return None

    def enable_conntrack_hooks(self) -> None:
        """The nat table, and a stateful rule in our own chain (referenced by nothing)."""
        iptc = self.iptc
        try:
            iptc.Table(iptc.Table.NAT).refresh()
            table = iptc.Table(iptc.Table.FILTER)
            table.refresh()
            if not table.is_chain(HOOK_CHAIN):
                table.create_chain(HOOK_CHAIN)
            chain = iptc.Chain(table, HOOK_CHAIN)
            if not any(self._comment_of(rule) == self.comment for rule in chain.rules):
                rule = iptc.Rule()
                match = rule.create_match("conntrack")
                match.ctstate = "NEW"
                rule.create_match("comment").comment = self.comment
                rule.create_target("RETURN")
                chain.append_rule(rule)
        except iptc.IPTCError as e:
            raise IptablesError("cannot set up the iptables hooks: %s" % e) from None

    def ensure_traffic_counter(self) -> None:
        iptc = self.iptc
        try:
            table = iptc.Table(iptc.Table.MANGLE)
            table.refresh()
            chain = iptc.Chain(table, "FORWARD")
            ours = [rule for rule in chain.rules if self._comment_of(rule) == self.comment]
            if len(ours) == 1:
                return
            rule = iptc.Rule()
            rule.create_match("connmark").mark = "%#x" % self.mark
            rule.create_match("comment").comment = self.comment
            rule.create_target("")
            self._commit(table, lambda: ([chain.delete_rule(old) for old in ours], chain.append_rule(rule)))
        except iptc.IPTCError as e:
            raise IptablesError("cannot set up the traffic counter: %s" % e) from None

    def kernel_traffic(self):
        """(packets, bytes) the kernel relayed on our connections, as counted by the rule."""
        iptc = self.iptc
        table = iptc.Table(iptc.Table.MANGLE)
        table.refresh()
        for rule in iptc.Chain(table, "FORWARD").rules:
            if self._comment_of(rule) == self.comment:
                return rule.get_counters()
        raise IptablesError("the traffic counter rule is gone")

    def remove_stale_inhibitors(self) -> int:
        """Inhibitor rules of ours left by an earlier run (e.g. after SIGKILL)."""
        iptc = self.iptc
        table = iptc.Table(iptc.Table.RAW)
        table.refresh()
        chain = iptc.Chain(table, "PREROUTING")
        stale = [rule for rule in chain.rules if self._comment_of(rule) == self.comment]
        if stale:
            self._commit(table, lambda: [chain.delete_rule(rule) for rule in stale])
        return len(stale)

    def _notrack_rule(self, flow):
        rule = self.iptc.Rule()
        rule.protocol = "udp"
        rule.src = flow.src
        rule.dst = flow.dst
        match = rule.create_match("udp")
        match.sport = str(flow.sport)
        match.dport = str(flow.dport)
        rule.create_match("comment").comment = self.comment
        target = rule.create_target("CT")
        target.notrack = ""
        return rule

    def hold(self, flows) -> list:
        """NOTRACK rules for these incoming flows, all in one commit; returns them for release()."""
        iptc = self.iptc
        table = iptc.Table(iptc.Table.RAW)
        chain = iptc.Chain(table, "PREROUTING")
        rules = [self._notrack_rule(flow) for flow in flows]
        self._commit(table, lambda: [chain.insert_rule(rule) for rule in rules])
        return rules

    def release(self, rules) -> None:
        if not rules:
            return
        iptc = self.iptc
        table = iptc.Table(iptc.Table.RAW)
        chain = iptc.Chain(table, "PREROUTING")
        self._commit(table, lambda: [chain.delete_rule(rule) for rule in rules])

    def _commit(self, table, change) -> None:
        table.autocommit = False
        try:
            table.refresh()
            change()
            table.commit()
        finally:
            table.autocommit = True
