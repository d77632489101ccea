"""A throwaway PostgreSQL server for tests: `with postgres_server() as url: ...`.

initdb into a fresh temp dir, pg_ctl start on 127.0.0.1 at a free port (unix socket inside the
temp dir, so no clash with a system cluster on 5432 or /var/run/postgresql), create a password
user and a database, yield a SQLAlchemy URL, then stop the server and delete everything, also
when the body raises. Needs the server binaries (Debian: `apt-get install postgresql`, found in
/usr/lib/postgresql/<ver>/bin; elsewhere on PATH or in $LITLAB_PG_BINDIR).

PostgreSQL refuses to run as root: as root every server-side command runs as the `postgres` OS
user (runuser) and the temp dir is handed to it; as anyone else the commands run directly.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

USER, PASSWORD, DB = "litlab", "litlab-test-pw", "litlab"
SUPERUSER = "postgres"  # the cluster's bootstrap role (initdb -U), reached over the socket only


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no non-root user to run them as): skip, don't fail."""


def find_bindir() -> Path:
    """Directory holding initdb and pg_ctl: $LITLAB_PG_BINDIR, Debian's newest version, PATH."""
    candidates = [os.environ.get("LITLAB_PG_BINDIR", "")]
    # Debian/Ubuntu keep the server tools off PATH, one dir per major version: take the newest.
    debian = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates += [str(Path(p).parent) for p in sorted(debian, key=_version_key, reverse=True)]
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    for d in candidates:
        if d and all((Path(d) / tool).is_file() for tool in ("initdb", "pg_ctl", "psql")):
            return Path(d)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, psql) not found: install them "
        "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) "
        "or point LITLAB_PG_BINDIR at their directory")


def _version_key(path: str) -> tuple[int, ...]:
    ver = Path(path).parent.parent.name  # /usr/lib/postgresql/<ver>/bin/initdb
    return tuple(int(x) for x in ver.split(".") if x.isdigit())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root = bindir, root
        self.data, self.sock, self.log = root / "data", root / "sock", root / "server.log"
        self.port = 0
        self.as_user: list[str] = []
        self.sock.mkdir()
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no `postgres` OS user to run the "
                                          "server as (PostgreSQL refuses to run as root)") from None
            runuser = shutil.which("runuser")  # util-linux; `su -c` (one shell string) otherwise
            self.as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
            # mkdtemp made root-owned 0700 dirs: hand them over, or initdb cannot create data/.
            for d in (root, self.sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)

    def cmd(self, tool: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / tool), *args]
        if self.as_user[:1] == ["su"]:
            argv = [*self.as_user, shlex.join(argv)]
        else:
            argv = [*self.as_user, *argv]
        # cwd: the tools chdir back to it and warn when the postgres user cannot read root's cwd.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST/PGPORT
        p = subprocess.run(argv, check=False, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{tool} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}{self.server_log()}")
        return p

    def server_log(self) -> str:
        try:
            return "\n--- server.log ---\n" + self.log.read_text()[-4000:]
        except OSError:
            return ""

    def init(self) -> None:
        # --no-sync: no fsync of the new cluster (seconds saved; a crash just loses a throwaway).
        # Trust over the private socket (mode 0700 dir) for set-up; TCP clients need the password.
        self.cmd("initdb", "-D", str(self.data), "-U", SUPERUSER, "--no-sync", "--no-locale", "-E", "UTF8",
                 "--auth-local=trust", "--auth-host=scram-sha-256")

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            # A port found free can be taken before the server binds it: retry with another one.
            self.port = _free_port()
            opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                    # durability off: tests never survive a crash, and commits become ~free
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            p = self.cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                         "start", check=False, timeout=90)
            if p.returncode == 0:
                return
            if attempt == attempts - 1 or "could not bind" not in self.server_log():
                raise RuntimeError(f"pg_ctl start failed:\n{p.stdout}\n{p.stderr}{self.server_log()}")

    def psql(self, sql: str) -> None:
        self.cmd("psql", "-h", str(self.sock), "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres",
                 "-v", "ON_ERROR_STOP=1", "-q", "-c", sql)

    def stop(self) -> None:
        # immediate: no checkpoint at shutdown; the data dir is deleted right after anyway.
        self.cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", check=False)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield `postgresql+psycopg2://litlab:...@127.0.0.1:PORT/litlab` on a fresh, empty cluster."""
    bindir = find_bindir()
    # In the system temp dir, not pytest's tmp_path: the socket path must stay under ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="litlab-pg-"))
    cluster = None
    try:
        cluster = _Cluster(bindir, root)
        cluster.init()
        cluster.start()
        cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        cluster.psql(f"CREATE DATABASE {DB} OWNER {USER}")
        yield f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{cluster.port}/{DB}"
    finally:
        # postmaster.pid also exists when `pg_ctl start -w` timed out with a server still coming up
        if cluster is not None and (cluster.data / "postmaster.pid").exists():
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # python tests/postgres.py: time a start/stop by hand
    t0 = time.perf_counter()
    with postgres_server() as url:
        print(url, f"up in {time.perf_counter() - t0:.2f}s")
    print(f"start+stop in {time.perf_counter() - t0:.2f}s")
