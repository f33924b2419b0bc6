"""The production components, started for real on loopback with no Docker: PostgreSQL from Debian's packages,
moto's S3 server, an MLflow tracking server (PostgreSQL backend, S3 artifacts). Each can be stopped and
started again, which is how the failure-injection tests take a service away in the middle of a DAG run."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s\n{_tail(log)}")


def _tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""


class Postgres:
    """A throwaway PostgreSQL cluster (initdb) on a free port, with one database and role per service."""

    def __init__(self, root: Path):
        found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (initdb not found): .ci/run installs it with "
                               "`apt-get install -y postgresql`; on your machine install Debian's postgresql")
        self.bin = Path(os.path.realpath(found)).parent
        # PostgreSQL refuses to run as root: as root, it runs as the postgres user, in a folder of its own
        # outside `root` (pytest's folders are private to root).
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            root = Path(tempfile.mkdtemp(prefix="qat-postgres-"))
            shutil.chown(root, "postgres")
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, free_port()
        self.data, self.log = root / "data", root / "postgres.log"
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def _run(self, *cmd) -> str:
        out = subprocess.run([*self.as_user, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {out.stderr or out.stdout}")
        return out.stdout

    def start(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, db: str = "postgres") -> str:
        return self._run(self.bin / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-d", db,
                         "-v", "ON_ERROR_STOP=1", "-tAc", statement).strip()

    def create_database(self, name: str, password: str) -> str:
        self.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        self.sql(f"CREATE DATABASE {name} OWNER {name}")
        return f"postgresql+psycopg2://{name}:{password}@127.0.0.1:{self.port}/{name}"


class Server:
    """A server process started from this venv, with its output in a log file; stop() and start() again."""

    def __init__(self, name: str, cmd: list[str], url: str, health: str, env: dict, log: Path,
                 timeout: float = 120):
        self.name, self.cmd, self.url, self.health, self.env, self.log = name, cmd, url, health, env, log
        self.timeout, self.proc = timeout, None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.url + self.health, self.timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def moto_s3(log: Path) -> Server:
    port = free_port()
    return Server("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}",
                  "/moto-api/", {}, log, timeout=60)


def compose_mlflow_flags(port: int) -> list[str]:
    """The MLflow server's --allowed-hosts as docker-compose.yaml gives it, plus this loopback port's names."""
    import yaml

    command = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yaml").read_text())[
        "services"]["mlflow"]["command"].split()
    hosts = command[command.index("--allowed-hosts") + 1] if "--allowed-hosts" in command else "localhost"
    return ["--allowed-hosts", f"{hosts},127.0.0.1:{port},localhost:{port}"]


def mlflow_server(backend_uri: str, artifacts: str, s3_endpoint: str, log: Path, compose_flags: bool = False
                  ) -> Server:
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts, "--serve-artifacts",
           *(compose_mlflow_flags(port) if compose_flags else [])]
    # No server-side job runner (GenAI evaluation jobs; about ten huey worker processes): nothing here uses it.
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server("mlflow", cmd, f"http://127.0.0.1:{port}", "/health", env, log, timeout=180)


class Inbox:
    """An SMTP server on loopback (aiosmtpd) that keeps every message it receives: where the notification tests
    and the engine test read what people were told."""

    def __init__(self):
        import email
        from email import policy

        from aiosmtpd.controller import Controller

        self.messages: list = []
        inbox = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                inbox.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def subjects(self) -> list[str]:
        return [m["Subject"] for m in self.messages]

    def bodies(self) -> list[str]:
        return [m.get_body(("html", "plain")).get_content() for m in self.messages]

    def wait_for(self, fragment: str, timeout: float) -> str:
        """The first subject holding `fragment`, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [s for s in self.subjects() if fragment in s]
            if hits:
                return hits[0]
            time.sleep(1)
        raise TimeoutError(f"no notification with {fragment!r} within {timeout:.0f} s; got {self.subjects()}")

    def close(self) -> None:
        self.controller.stop()
