"""Real accounting servers from Debian's packages, started on loopback for a
test or a benchmark: PostgreSQL (``postgresql``) and FreeRADIUS
(``freeradius``). Plain classes, no pytest: tests/accounting/conftest.py
wraps them in fixtures and bench/accounting.py uses them as they are.

Both run as children of a ``tests.support.processes.ProcessManager`` (death
signal, own PID namespace and process group, a log file each), in a
directory of their own under /tmp, on free ports of 127.0.0.1, and never
touch the distribution's own cluster, configuration or services.

- ``PostgresServer``: ``initdb`` of a throwaway cluster (or a copy of one
  made before, ``PostgresServer.template``), ``postgres`` run as the
  ``postgres`` user (it refuses root), password authentication over TCP,
  one database per ``create_database``; ``stop()`` / ``start()`` take it
  down and bring it back on the same port (the fault tests' outage).
- ``RadiusServer``: a copy of /etc/freeradius/3.0 cut down to one virtual
  server (auth and acct listeners on free ports, client 127.0.0.1 with a
  secret) whose accounting section is a ``detail`` module writing every
  Accounting-Request to one file; MediaProxy's attributes (radius/dictionary)
  are added to its dictionary so it logs them by name. ``client_config()``
  writes what the dispatcher reads: a radiusclient-style configuration file
  (acctserver, servers, dictionary, radius_timeout, radius_retries),
  its servers file and a dictionary that includes FreeRADIUS' RFC 2865/2866
  dictionaries. ``entries()`` parses the detail file.
- ``MariaDBServer``: ``mariadb-install-db`` of a throwaway data directory,
  ``mariadbd --no-defaults`` (so /etc/mysql is not read; utf8mb4 as Debian's
  packaged configuration has it) dropping to the ``mysql`` user, on
  127.0.0.1 and a socket in its directory; a password user made by an
  ``--init-file`` at every start. Its own ``mariadb_missing_requirements()``
  (package ``mariadb-server``, PyMySQL), so that PostgreSQL's and FreeRADIUS'
  tests do not depend on it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import Process, ProcessManager, wait_for

REPO = Path(__file__).resolve().parents[2]
OUR_DICTIONARY = REPO / "radius" / "dictionary"
FREERADIUS_CONFIG = Path("/etc/freeradius/3.0")
FREERADIUS_DICTIONARIES = Path("/usr/share/freeradius")
START_TIMEOUT = 30.0          # generous: other test runs share this 2-CPU machine


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb and postgres, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    for path in reversed(candidates):
        directory = Path(path).parent
        if (directory / "initdb").exists():
            return directory
    return None


def missing_requirements() -> list[str]:
    """Why the servers cannot run here (empty when they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (postgres runs as the postgres user, FreeRADIUS' files are root's)")
    if postgres_bin() is None:
        problems.append("no PostgreSQL server (apt package postgresql)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        problems.append("no postgres user (apt package postgresql)")
    if shutil.which("freeradius") is None or not (FREERADIUS_CONFIG / "radiusd.conf").exists():
        problems.append("no FreeRADIUS server (apt package freeradius)")
    if not (FREERADIUS_DICTIONARIES / "dictionary.rfc2866").exists():
        problems.append("no FreeRADIUS dictionaries in %s" % FREERADIUS_DICTIONARIES)
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            problems.append("missing tool: %s (apt package util-linux)" % tool)
    return problems


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, directories, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _descendants(pid: int, include_self: bool = False) -> list[int]:
    """`pid`'s children, theirs, ... (postgres' processes each lead a session of their own,
    so a process group does not hold them all)."""
    found, pending = ([pid] if include_self else []), [pid]
    while pending:
        parent = pending.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            children = []
        found += children
        pending += children
    return found


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -- what the servers share --


class _ServerProcess:
    """A server run as one ProcessManager child (``self.process``), stopped by a signal to
    the server alone (not to its PID namespace's tiny init, whose end would kill the server
    before its own shutdown), then by the manager for what is left."""

    process = None
    STOP_SIGNAL = signal.SIGTERM

    def stop(self) -> None:
        if self.process is not None and self.process.running:
            self.process.send_signal(self.STOP_SIGNAL)
            try:
                self.process.wait(timeout=30)
            except AssertionError:
                pass                       # stop() below kills what is left
        if self.process is not None:
            self.process.stop(timeout=5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running


# -- PostgreSQL --


class PostgresServer(_ServerProcess):
    """A throwaway PostgreSQL cluster on 127.0.0.1:port."""

    USER = "mediaproxy"
    PASSWORD = "mp-accounting-secret"
    STOP_SIGNAL = signal.SIGINT        # fast shutdown: open connections are cut, as when a server goes down

    def __init__(self, manager: ProcessManager, template: Path | None = None, fsync: bool = True,
                 name: str = "postgresql"):
        self.manager = manager
        self.name = name
        self.fsync = fsync
        self.bin = postgres_bin()
        # Under /tmp, not under pytest's tmp_path: the postgres user cannot enter root's 0700 directories.
        self.directory = Path(tempfile.mkdtemp(prefix="mp-acct-pg-"))
        os.chmod(self.directory, 0o755)
        self.data = self.directory / "data"
        if template is not None:
            shutil.copytree(template, self.data, symlinks=True)
        else:
            self.initdb(self.data)
        _chown_tree(self.directory, "postgres")
        os.chmod(self.data, 0o700)
        self.port = free_port()
        self.process: Process | None = None

    @classmethod
    def initdb(cls, data: Path) -> None:
        """A new cluster in `data` (owned by postgres; its parent must exist and be enterable)."""
        parent = Path(data).parent
        _chown_tree(parent, "postgres")
        password_file = parent / "password"
        password_file.write_text(cls.PASSWORD + "\n")
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
        os.chmod(password_file, 0o600)
        try:
            subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                            str(postgres_bin() / "initdb"), "-D", str(data), "-U", cls.USER,
                            "--pwfile", str(password_file), "--auth=scram-sha-256", "-E", "UTF8",
                            "--locale=C", "--no-sync"],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                           stdin=subprocess.DEVNULL)
        except subprocess.CalledProcessError as e:
            raise RuntimeError("initdb failed:\n%s" % e.stdout.decode(errors="replace")) from None
        finally:
            password_file.unlink()

    @classmethod
    def template(cls) -> Path:
        """A fresh cluster's data directory to copy (initdb takes seconds, a copy a fraction of one).
        The caller removes its parent directory when done."""
        parent = Path(tempfile.mkdtemp(prefix="mp-acct-pg-template-"))
        os.chmod(parent, 0o755)
        cls.initdb(parent / "data")
        return parent / "data"

    def start(self) -> None:
        assert self.process is None or not self.process.running, "already running"
        argv = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.directory), "-c", "max_connections=50", "-c", "shared_buffers=16MB",
                "-c", "log_min_messages=warning", "-c", "fsync=%s" % ("on" if self.fsync else "off")]
        if not self.fsync:
            argv += ["-c", "full_page_writes=off"]       # what is committed still survives a crash of postgres
        self.process = self.manager.start(self.name, argv, cwd=self.directory)
        wait_for(self._ready, timeout=START_TIMEOUT, interval=0.1, message="PostgreSQL on port %d" % self.port)

    def _ready(self) -> bool:
        self.process.assert_running()
        result = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return result.returncode == 0


    def freeze(self) -> None:
        """SIGSTOP every postgres process: the port still accepts TCP connections (the kernel
        does that), nothing answers (a hung server, not a dead one). `thaw()` undoes it."""
        for pid in _descendants(self.process.command_pid, include_self=True):
            _kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            for pid in _descendants(self.process.command_pid, include_self=True):
                _kill(pid, signal.SIGCONT)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (the default driver: psycopg2)."""
        return "postgresql://%s:%s@127.0.0.1:%d/%s" % (self.USER, self.PASSWORD, self.port, database)

    def connect(self, database: str = "postgres"):
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER, password=self.PASSWORD,
                               dbname=database, autocommit=True, connect_timeout=10)

    def create_database(self, database: str) -> str:
        with self.connect() as connection:
            connection.execute('CREATE DATABASE "%s"' % database)
        return self.url(database)

    def query(self, database: str, sql: str, *parameters) -> list[tuple]:
        with self.connect(database) as connection:
            return connection.execute(sql, parameters or None).fetchall()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- FreeRADIUS --


class RadiusServer(_ServerProcess):
    """FreeRADIUS in debug mode on 127.0.0.1, logging accounting requests to ``detail_path``."""

    SECRET = "mp-radius-secret"

    def __init__(self, manager: ProcessManager, name: str = "freeradius"):
        self.manager = manager
        self.name = name
        self.directory = Path(tempfile.mkdtemp(prefix="mp-acct-radius-"))
        self.raddb = self.directory / "raddb"
        self.detail_path = self.directory / "detail"
        self.auth_port = free_port(socket.SOCK_DGRAM)
        self.acct_port = free_port(socket.SOCK_DGRAM)
        while self.acct_port == self.auth_port:
            self.acct_port = free_port(socket.SOCK_DGRAM)
        self.process: Process | None = None
        self._configure()

    def _configure(self) -> None:
        shutil.copytree(FREERADIUS_CONFIG, self.raddb, symlinks=True)
        for name in ("log", "run"):
            (self.directory / name).mkdir()
        settings = {"logdir": self.directory / "log", "raddbdir": self.raddb, "run_dir": self.directory / "run",
                    "radacctdir": self.directory / "log"}
        config = (self.raddb / "radiusd.conf").read_text()
        for key, value in settings.items():
            config, count = re.subn(r"(?m)^%s\s*=.*$" % key, "%s = %s" % (key, value), config)
            assert count == 1, "radiusd.conf has no single %s line" % key
        # Run as root (we are), proxy nothing.
        config = re.sub(r"(?m)^(\s*)(user|group)\s*=\s*freerad\s*$", r"\1# \2 = freerad", config)
        config = re.sub(r"(?m)^proxy_requests\s*=.*$", "proxy_requests = no", config)
        (self.raddb / "radiusd.conf").write_text(config)
        (self.raddb / "clients.conf").write_text(
            "client mediaproxy {\n\tipaddr = 127.0.0.1\n\tsecret = %s\n}\n" % self.SECRET)
        # One virtual server, one module of our own: the detail writer (and `always` for the policies).
        for directory in ("sites-enabled", "mods-enabled"):
            for entry in (self.raddb / directory).iterdir():
                entry.unlink()
        (self.raddb / "mods-enabled" / "always").symlink_to("../mods-available/always")
        (self.raddb / "mods-enabled" / "mediaproxy_detail").write_text(
            "detail mediaproxy_detail {\n"
            "\tfilename = %s\n"
            "\tescape_filenames = no\n"
            "\tpermissions = 0600\n"
            "\theader = \"%%t\"\n"
            "}\n" % self.detail_path)
        (self.raddb / "sites-enabled" / "mediaproxy").write_text(
            "server default {\n"
            "listen {\n\ttype = auth\n\tipaddr = 127.0.0.1\n\tport = %d\n}\n"
            "listen {\n\ttype = acct\n\tipaddr = 127.0.0.1\n\tport = %d\n}\n"
            "authorize {\n\treject\n}\n"
            "authenticate {\n}\n"
            "preacct {\n}\n"
            "accounting {\n\tmediaproxy_detail\n}\n"
            "}\n" % (self.auth_port, self.acct_port))
        # MediaProxy's attributes, so the detail file names them.
        with open(self.raddb / "dictionary", "a") as f:
            f.write("\n# MediaProxy (radius/dictionary)\n")
            f.write(OUR_DICTIONARY.read_text())

    def start(self) -> None:
        assert self.process is None or not self.process.running, "already running"
        self.process = self.manager.start(self.name, ["freeradius", "-X", "-d", str(self.raddb)],
                                          cwd=self.directory)
        # Each start has a log of its own (the manager names a restart freeradius-2, ...).
        self.process.wait_for_log(r"Ready to process requests", timeout=START_TIMEOUT)

    def client_config(self, directory: Path, timeout: int = 2, retries: int = 1) -> Path:
        """The proxy's radiusclient-style configuration for this server (written into `directory`).

        Its dictionary is FreeRADIUS' RFC 2865/2866 ones (what a proxy's client
        dictionary holds: standard attributes, value names as the RFCs and
        FreeRADIUS spell them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "servers").write_text("# host secret\n127.0.0.1 %s\n" % self.SECRET)
        (directory / "dictionary").write_text(
            "# the standard RADIUS attributes\n"
            "$INCLUDE %s\n$INCLUDE %s\n" % (FREERADIUS_DICTIONARIES / "dictionary.rfc2865",
                                            FREERADIUS_DICTIONARIES / "dictionary.rfc2866"))
        path = directory / "radiusclient.conf"
        path.write_text("# radiusclient configuration, as a SIP proxy has it\n"
                        "authserver 127.0.0.1:%d\n"
                        "acctserver 127.0.0.1:%d\n"
                        "servers %s\n"
                        "dictionary %s\n"
                        "radius_timeout %d\n"
                        "radius_retries %d\n"
                        "bindaddr *\n" % (self.auth_port, self.acct_port, directory / "servers",
                                          directory / "dictionary", timeout, retries))
        return path

    def detail_text(self) -> str:
        try:
            return self.detail_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def entries(self) -> list[dict]:
        return parse_detail(self.detail_text())

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _unquote(value: str) -> str:
    assert value.startswith('"') and value.endswith('"'), value
    text, out, i = value[1:-1], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            following = text[i + 1]
            if following in _ESCAPES:
                out.append(_ESCAPES[following])
                i += 2
                continue
            if re.match(r"[0-7]{3}", text[i + 1:i + 4]):
                out.append(chr(int(text[i + 1:i + 4], 8)))
                i += 4
                continue
        out.append(char)
        i += 1
    return "".join(out)


def parse_detail(text: str) -> list[dict]:
    """The entries of a FreeRADIUS detail file: a header line (the time), then
    tab-indented ``Name = value`` lines, then an empty line. Strings are
    unquoted, integers become int, anything else (named values, addresses)
    stays text. An attribute sent more than once becomes a list."""
    entries = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        entry: dict = {}
        for line in lines[1:]:
            name, separator, value = line.strip().partition(" = ")
            assert separator, "not an attribute line in the detail file: %r" % line
            if value.startswith('"'):
                parsed: object = _unquote(value)
            elif re.fullmatch(r"-?\d+", value):
                parsed = int(value)
            else:
                parsed = value
            if name in entry:
                previous = entry[name]
                entry[name] = (previous if isinstance(previous, list) else [previous]) + [parsed]
            else:
                entry[name] = parsed
        entries.append(entry)
    return entries


# -- MariaDB --


def mariadb_server() -> str | None:
    """mariadbd (Debian: /usr/sbin, not always on root's PATH), or None."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return shutil.which("mariadbd", path=search) or shutil.which("mysqld", path=search)


def mariadb_missing_requirements() -> list[str]:
    """Why MariaDBServer cannot run here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (mariadbd drops to the mysql user, its files are chowned to it)")
    if mariadb_server() is None or shutil.which("mariadb-install-db") is None:
        problems.append("no MariaDB server (apt package mariadb-server)")
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        problems.append("no mysql user (apt package mariadb-server)")
    try:
        import pymysql  # noqa: F401
    except ImportError:
        problems.append("no PyMySQL (pip install -e '.[test]')")
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            problems.append("missing tool: %s (apt package util-linux)" % tool)
    return problems


class MariaDBServer(_ServerProcess):
    """A throwaway MariaDB server on 127.0.0.1:port (``durable=False``: commits are not
    flushed to disk one by one, for tests that never crash it)."""

    USER = "mediaproxy"
    PASSWORD = "mp-accounting-secret"
    # small: a data directory of ~25 MB, seconds to make
    SIZES = ("--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M")

    def __init__(self, manager: ProcessManager, durable: bool = True, name: str = "mariadb"):
        self.manager = manager
        self.name = name
        self.durable = durable
        self.server = mariadb_server()
        # Under /tmp, owned by mysql: mariadbd runs as that user.
        self.directory = Path(tempfile.mkdtemp(prefix="mp-acct-mariadb-"))
        try:
            os.chmod(self.directory, 0o755)
            self.data = self.directory / "data"
            self.socket = self.directory / "mariadbd.sock"
            self.init_file = self.directory / "init.sql"
            self.init_file.write_text(
                "CREATE USER IF NOT EXISTS '{user}'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
                "GRANT ALL PRIVILEGES ON *.* TO '{user}'@'127.0.0.1';\n".format(user=self.USER,
                                                                              password=self.PASSWORD))
            _chown_tree(self.directory, "mysql")
            os.chmod(self.init_file, 0o600)
            self.install_db()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.port = free_port()
        self.process: Process | None = None

    def install_db(self) -> None:
        """The system tables in a new data directory (root only by the socket, as Debian does)."""
        try:
            subprocess.run(["mariadb-install-db", "--no-defaults", "--datadir=%s" % self.data, "--user=mysql",
                            "--auth-root-authentication-method=socket", "--skip-test-db",
                            "--skip-name-resolve", *self.SIZES],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                           stdin=subprocess.DEVNULL, cwd=self.directory, env=self._environment())
        except subprocess.CalledProcessError as e:
            raise RuntimeError("mariadb-install-db failed:\n%s" % e.stdout.decode(errors="replace")) from None

    def start(self) -> None:
        assert self.process is None or not self.process.running, "already running"
        argv = [self.server, "--no-defaults", "--user=mysql", "--datadir=%s" % self.data,
                "--socket=%s" % self.socket, "--pid-file=%s" % (self.directory / "mariadbd.pid"),
                "--tmpdir=%s" % self.directory, "--bind-address=127.0.0.1", "--port=%d" % self.port,
                "--skip-name-resolve",
                "--init-file=%s" % self.init_file, "--max-connections=50",
                # Debian's packaged configuration (/etc/mysql/mariadb.conf.d/50-server.cnf)
                "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci", *self.SIZES]
        if not self.durable:
            argv += ["--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0"]
        self.process = self.manager.start(self.name, argv, cwd=self.directory, env=self._environment())
        wait_for(self._ready, timeout=START_TIMEOUT, interval=0.1, message="MariaDB on port %d" % self.port)

    def _environment(self) -> dict:
        # mariadbd makes its temporary files in TMPDIR as the mysql user: ours may not be writable to it
        return {**os.environ, "TMPDIR": str(self.directory)}

    def _ready(self) -> bool:
        import pymysql
        self.process.assert_running()
        try:
            self.connect().close()          # the password user exists: the init file ran
        except pymysql.err.OperationalError:
            return False
        return True


    def url(self, database: str = "mysql", driver: str = "pymysql") -> str:
        """The SQLAlchemy URL (``mysql+pymysql://``; plain ``mysql://`` means mysqlclient)."""
        return "mysql+%s://%s:%s@127.0.0.1:%d/%s" % (driver, self.USER, self.PASSWORD, self.port, database)

    def connect(self, database: str | None = None):
        import pymysql
        return pymysql.connect(host="127.0.0.1", port=self.port, user=self.USER, password=self.PASSWORD,
                               database=database, autocommit=True, connect_timeout=10, charset="utf8mb4")

    def create_database(self, database: str) -> str:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE `%s`" % database)
        finally:
            connection.close()
        return self.url(database)

    def query(self, database: str, sql: str, *parameters) -> list[tuple]:
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters or None)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
