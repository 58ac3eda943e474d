"""The daemons' log lines: what reaches stderr, when, and that the quick path
for info lines writes exactly what the logging module would."""

import logging
import os
import re
from types import SimpleNamespace

import pytest

from mediaproxy import logs, outgoing


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A file for the daemon's stderr (start_logging logs there); the root logger's set-up restored after."""
    path = tmp_path / "stderr"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    path = SimpleNamespace(fd=fd, read_text=path.read_text)
    monkeypatch.setattr(outgoing, "_turn_ends", [])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield path
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    root.handlers[:], root.level = saved[0], saved[1]
    logs._quick = None
    os.close(fd)


def start_logging(stderr_file, **flags):
    logs.setup_logging("media-relay", options(**flags), logging.INFO, fd=stderr_file.fd)


def options(**flags):
    return SimpleNamespace(**{"no_fork": False, "systemd": False, "debug": False, **flags})


def turn_end():
    for callback in outgoing._turn_ends:
        callback()


def logger(name):
    log = logging.getLogger(name)
    assert isinstance(log, logs.QuickLogger)        # every mediaproxy logger (mediaproxy/__init__.py)
    return log


def test_info_lines_wait_for_the_end_of_the_turn_and_warnings_do_not(stderr_file):
    start_logging(stderr_file, no_fork=True)
    log = logger("mediaproxy.relay")
    log.info("session %s created (%s)", "c1@host", "audio")
    assert stderr_file.read_text() == ""
    turn_end()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mediaproxy.relay INFO: session c1@host created "
                        r"\(audio\)\n", stderr_file.read_text())
    log.warning("relay %s is gone", "10.0.0.1")
    assert stderr_file.read_text().endswith("mediaproxy.relay WARNING: relay 10.0.0.1 is gone\n")


@pytest.mark.parametrize("flags", [{"no_fork": True}, {"systemd": True}])
def test_a_quick_info_line_is_the_line_the_logging_module_makes(stderr_file, flags):
    start_logging(stderr_file, **flags)
    log = logger("mediaproxy.dispatcher")
    log.info("session %s on relay %s", "c1@host", "10.0.0.1")          # the quick path
    logs._quick = None
    log.info("session %s on relay %s", "c1@host", "10.0.0.1")          # the logging module's
    turn_end()
    quick, standard = stderr_file.read_text().splitlines()
    strip_msecs = re.compile(r",\d{3} ")
    assert strip_msecs.sub(" ", quick) == strip_msecs.sub(" ", standard)
    assert standard.endswith("INFO: session c1@host on relay 10.0.0.1")


def test_what_the_quick_path_cannot_write_takes_the_logging_modules_path(stderr_file, caplog):
    start_logging(stderr_file, systemd=True)
    log = logger("mediaproxy.relay")
    log.info("%(call)s ended", {"call": "c1"})          # a mapping of values
    log.info("plain text, no arguments")
    log.info("session %s", "c2", extra={"x": 1})
    log.debug("not shown at info")
    turn_end()
    assert stderr_file.read_text().splitlines() == ["INFO: c1 ended", "INFO: plain text, no arguments",
                                                    "INFO: session c2"]


def test_lines_still_waiting_are_written_when_logging_shuts_down(stderr_file):
    start_logging(stderr_file, systemd=True)
    logger("mediaproxy.relay").info("media-relay stopped")
    logging.getLogger().handlers[0].close()
    assert stderr_file.read_text() == "INFO: media-relay stopped\n"


def test_syslog_lines_take_the_logging_modules_path(monkeypatch):
    monkeypatch.setattr(logging.handlers.SysLogHandler, "_connect_unixsocket", lambda self, address: None)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging("media-relay", options(), logging.INFO)
        assert logs._quick is None
        assert isinstance(root.handlers[0], logging.handlers.SysLogHandler)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
