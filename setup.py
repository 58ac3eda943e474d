#!/usr/bin/env python3
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("mediaproxy/__init__.py").read_text()).group(1)

setup(
    name="mediaproxy",
    version=version,
    description="Media relay for SIP proxies (OpenSIPS, Kamailio): NAT traversal for RTP",
    long_description=Path("README").read_text() if Path("README").exists() else "",
    license="GPL-2.0-only",
    author="MediaProxy developers",
    packages=find_packages(include=["mediaproxy", "mediaproxy.*"]),
    # the dispatcher's status page (HTML, CSS, JavaScript), served from the package
    package_data={"mediaproxy.dispatcher": ["static/*"]},
    scripts=["scripts/media-dispatcher", "scripts/media-relay", "scripts/media-sessions"],
    python_requires=">=3.11",
    install_requires=[
        "twisted>=22.4",
        "pyopenssl>=23.0",
        "service-identity>=18.1",
        "python-iptables>=1.0",
        "pyroute2>=0.7",
        "sqlalchemy>=1.4",
        "pyrad>=2.1",
        "prometheus-client>=0.16",
    ],
    extras_require={
        # database drivers for [Database] dburi URLs (SQLAlchemy picks them by URL)
        "postgresql": ["psycopg[binary]>=3.1", "psycopg2-binary>=2.9"],
        "mysql": ["pymysql>=1.0"],
        # make bench: the profiles of bench/control_profile.py and bench/userspace.py
        "bench": ["py-spy>=0.3"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "cryptography>=38",
                 "psycopg[binary]>=3.1", "psycopg2-binary>=2.9", "pymysql>=1.0",
                 # the status page's browser test (with Debian's chromium and chromium-driver)
                 "selenium>=4.8"],
    },
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v2 (GPLv2)",
        "Operating System :: POSIX :: Linux",
        "Framework :: Twisted",
        "Topic :: Communications :: Telephony",
    ],
)
