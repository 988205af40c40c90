"""A real PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries, a fresh data directory in a
temporary folder, 127.0.0.1 on a free port, password authentication; stopped by its PID.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user the Debian package creates.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    """Directory of ``initdb``/``postgres`` (the newest Debian version installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """``with PostgresServer() as pg: pg.url`` (a ``postgresql://`` URL with a random password)."""

    def __init__(self, fast: bool = True):
        self.fast = fast  # fsync off: test data need not survive a power cut
        self.proc: subprocess.Popen | None = None
        self.password = "pw-" + secrets.token_hex(8)
        self.port = 0
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://medrl:{self.password}@127.0.0.1:{self.port}/postgres"

    def _as_owner(self) -> dict:
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def __enter__(self) -> "PostgresServer":
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install -y postgresql; .ci/run does it)")
        self.dir = Path(tempfile.mkdtemp(prefix="medrl-pg-"))
        owner = self._as_owner()
        if owner:
            os.chown(self.dir, owner["user"], owner["group"])
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        if owner:
            os.chown(pwfile, owner["user"], owner["group"])
        data = self.dir / "data"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "medrl", "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, cwd=self.dir, **owner)
        pwfile.unlink()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._start()
        return self

    def _start(self) -> None:
        """Start the server on ``self.dir``'s data directory and ``self.port``; return once it accepts connections."""
        bindir, owner = pg_bin(), self._as_owner()
        opts = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"] if self.fast else []
        self._log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.dir / "data"), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.dir), "-c", "max_connections=100", "-c", "shared_buffers=32MB", *opts],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True, **owner)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres failed to start:\n" + (self.dir / "server.log").read_text()[-2000:])
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("postgres did not become ready in 60 s")

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected, committed data kept
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self._log.close()

    def restart(self, down_s: float) -> None:
        """Stop the server (fast shutdown: every client loses its connection), keep it down ``down_s`` seconds and
        start it again on the same port and data (a store outage)."""
        self._stop()
        time.sleep(down_s)
        self._start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self._stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
