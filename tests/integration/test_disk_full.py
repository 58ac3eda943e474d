"""The dispatcher's runtime directory on a full disk (issue 9 item 5): the
session table and the accounting queue fail loudly, nothing written is
corrupted, and everything is stored once there is room again."""

import json
import os
import subprocess

import pytest

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call
from tests.integration.test_accounting import rows
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: the dispatcher's runtime directory and spool."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk):
    """Take every free byte of `disk`; returns the filler to remove."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_runtime_disk_fails_loudly_corrupts_nothing_and_every_call_is_accounted_later(cluster, small_disk,
                                                                                              tmp_path):
    database_dir = tmp_path / "db"                       # missing at first: the back-end is down
    url = "sqlite:///%s" % (database_dir / "accounting.sqlite")
    cluster.runtime_root = small_disk / "run"
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}})
    cluster.start_relay(RELAY_A)
    spool = small_disk / "run" / "dispatcher" / "accounting" / "database"
    with cluster.proxy() as proxy:
        calls = [Call(proxy, f"call-{n}") for n in range(3)]
        try:
            for call in calls:
                call.exchange()
            filler = fill(small_disk)
            assert proxy.remove("call-0") == "removed"
            cluster.dispatcher.wait_for_log(r"database accounting: cannot store a record in .*: No space left on "
                                            r"device \(1 kept in memory\)", timeout=5)
            assert json.loads(cluster.management_command("accounting")[0])["queued"] == 1
            filler.unlink()                                  # room again: both records reach the spool
            assert proxy.remove("call-1") == "removed"
            wait_for(lambda: len(list(spool.glob("*.json"))) == 2, timeout=5, message="two spooled records")
            assert sorted(json.loads(path.read_text())["call_id"] for path in spool.glob("*.json")) == \
                ["call-0", "call-1"]
            assert not list(spool.glob("*.tmp"))             # no half-written record

            # The session table cannot be saved at stop: said, and no half-written file is left.
            filler = fill(small_disk)
            cluster.dispatcher.stop()
            assert "could not save the session table" in cluster.dispatcher.log_text()
            assert not list((small_disk / "run" / "dispatcher").glob("dispatcher-state.json*"))
            filler.unlink()
            database_dir.mkdir()                             # the back-end is back too
            cluster._run_dispatcher()
            cluster.wait_relays([RELAY_A])                   # the relay reconciles: call-2 is adopted
            wait_for(lambda: [row[0] for row in rows(url)] == ["call-0", "call-1"], timeout=30, interval=0.5,
                     message="the spooled records in the database")
            with cluster.proxy() as again:                   # a connection to the new dispatcher
                assert again.remove("call-2") == "removed"
            wait_for(lambda: [row[0] for row in rows(url)] == ["call-0", "call-1", "call-2"], timeout=30,
                     interval=0.5, message="every call accounted once")
        finally:
            for call in calls:
                call.close()
    cluster.assert_alive()
