"""A dispatcher restart in the middle of calls (SPEC §8): the calls keep
their media, and a later BYE still reaches their relay and its statistics."""

import json
import signal

import pytest
import sqlalchemy

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call
from tests.integration.test_accounting import rows
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def one_relay(cluster):
    cluster.start_dispatcher()
    cluster.start_relay(RELAY_A)
    return cluster


def test_a_restart_keeps_the_call_and_the_bye_gets_its_statistics(one_relay):
    cluster = one_relay
    with cluster.proxy() as proxy:
        call = Call(proxy, "through-restart")
    try:
        call.exchange()
        cluster.restart_dispatcher()
        cluster.dispatcher.wait_for_log(r"restored 1 sessions on 1 relays", timeout=5)
        cluster.wait_relays([RELAY_A])
        got = call.exchange()                       # media never depended on the dispatcher
        assert got["caller"] and got["callee"]
        with cluster.proxy() as proxy:
            assert proxy.remove("through-restart") == "removed"
        assert cluster.sessions() == []
        assert "Traceback" not in cluster.dispatcher.log_text()
    finally:
        call.close()


def test_a_bye_before_the_relay_is_back_is_carried_out_when_it_is(cluster):
    cluster.start_dispatcher()
    cluster.start_relay(RELAY_A, reconnect_delay=3)
    with cluster.proxy() as proxy:
        call = Call(proxy, "early-bye")
    call.close()
    cluster.restart_dispatcher()
    with cluster.proxy() as proxy:
        assert proxy.remove("early-bye") == "removed"
    cluster.dispatcher.wait_for_log(r"early-bye: its relay 127\.0\.0\.2 is not connected", timeout=5)
    cluster.wait_relays([RELAY_A])
    wait_for(lambda: cluster.summary()[0]["session_count"] == 0, timeout=5,
             message="the relay still holds the session")


def test_sessions_of_a_killed_dispatcher_are_adopted_from_the_relay(one_relay):
    cluster = one_relay
    with cluster.proxy() as proxy:
        call = Call(proxy, "adopted")
    call.close()
    cluster.restart_dispatcher(signum=signal.SIGKILL)      # nothing saved
    cluster.wait_relays([RELAY_A])
    cluster.dispatcher.wait_for_log(r"session adopted on relay 127\.0\.0\.2 adopted", timeout=5)
    with cluster.proxy() as proxy:
        assert proxy.remove("adopted") == "removed"
    assert cluster.sessions() == []


def test_a_corrupt_state_file_is_set_aside_and_the_dispatcher_starts(one_relay):
    cluster = one_relay
    state = cluster.runtime_root / "dispatcher" / "dispatcher-state.json"
    cluster.dispatcher.stop()
    state.write_text('{"version": 1, "sessions": [{"call_id": 7}')
    cluster.restart_dispatcher()
    cluster.dispatcher.wait_for_log(r"the saved session table .* is unusable", timeout=5)
    assert list(state.parent.glob("dispatcher-state.json.bad-*"))
    cluster.wait_relays([RELAY_A])
    with cluster.proxy() as proxy:
        call = Call(proxy, "after-corruption")
        call.close()
        assert proxy.remove("after-corruption") == "removed"


def test_sessions_of_a_relay_that_never_comes_back_are_lost_and_accounted(cluster, tmp_path):
    url = "sqlite:///%s" % (tmp_path / "accounting.sqlite")
    cluster.start_dispatcher(cleanup_dead_relays_after=2, accounting="database",
                             sections={"Database": {"dburi": url}})
    relay = cluster.start_relay(RELAY_A)
    with cluster.proxy() as proxy:
        call = Call(proxy, "orphan")
    call.close()
    relay.stop(signum=signal.SIGKILL)
    cluster.dispatcher.wait_for_log(r"relay 127\.0\.0\.2 did not come back in 2 s: its 1 sessions are lost",
                                    timeout=10)
    cluster.dispatcher.wait_for_log(r"session orphan lost: relay 127\.0\.0\.2 did not come back", timeout=5)
    with cluster.proxy() as proxy:
        assert proxy.remove("orphan") == "error"
    wait_for(lambda: rows(url), timeout=10, message="no accounting row for the lost call")
    [(call_id, _, _, info)] = rows(url)
    info = json.loads(info)
    assert call_id == "orphan" and info["relay_lost"] is True and info["streams"] == []
    assert info["start_time"] is not None and info["duration"] >= 0


def test_a_call_that_expires_while_the_dispatcher_is_down_is_reported_when_it_is_back(cluster, tmp_path):
    url = "sqlite:///%s" % (tmp_path / "accounting.sqlite")
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}})
    relay = cluster.start_relay(RELAY_A, stream_timeout=1)
    with cluster.proxy() as proxy:
        call = Call(proxy, "expired-meanwhile")
    call.close()
    cluster.dispatcher.stop(signum=signal.SIGKILL)
    relay.wait_for_log(r"session expired-meanwhile expired while its dispatcher 127\.0\.0\.1 is not connected",
                       timeout=10)
    cluster.restart_dispatcher()
    cluster.dispatcher.wait_for_log(r"session expired-meanwhile expired on relay 127\.0\.0\.2", timeout=10)
    engine = sqlalchemy.create_engine(url)

    def accounted():
        try:
            with engine.connect() as connection:
                return connection.execute(sqlalchemy.text("SELECT info FROM media_sessions")).all()
        except sqlalchemy.exc.OperationalError:
            return []
    try:
        [(info,)] = wait_for(accounted, timeout=10, message="the expired call was not accounted")
    finally:
        engine.dispose()
    assert json.loads(info)["timed_out"] is True
