"""Packaging tests: they build the Debian packages and install them on this
machine (root, apt, dpkg-buildpackage, lintian); without those they are
skipped."""

from tests.support.netns import make_topology  # noqa: F401
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401
