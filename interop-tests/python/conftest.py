"""Fixtures for the Python client interop suite.

`broker` gives every test its own warren process: a free port on 127.0.0.1, its own data dir
under pytest's tmp_path, output in <tmp_path>/warren.log (printed when the test fails). The
binary is $WARREN_BIN, else <repo>/target/debug/warren (build it with `cargo build --bin
warren`). With AMQP_ADDR=host:port (or an amqp:// URL) the tests run against that broker
instead, e.g. a RabbitMQ from scripts/rabbitmq.sh. Safe under pytest-xdist.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 10.0
PORT_ATTEMPTS = 5


def warren_bin() -> Path:
    if os.environ.get("WARREN_BIN"):
        return Path(os.environ["WARREN_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "warren"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class BrokerInfo:
    host: str
    port: int
    external: bool = False
    log_path: Optional[Path] = None
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        v = urllib.parse.quote(vhost, safe="")
        return f"amqp://{user}:{password}@{self.host}:{self.port}/{v}"

    def pika_params(self, user: str = "guest", password: str = "guest", vhost: str = "/", **kw):
        import pika

        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("blocked_connection_timeout", 10)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            **kw,
        )

    def logs(self) -> str:
        if self.log_path is None:
            return "<external broker: no logs>"
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"


def external_broker() -> Optional[BrokerInfo]:
    spec = os.environ.get("AMQP_ADDR", "").strip()
    if not spec:
        return None
    if spec.startswith("amqp://"):
        u = urllib.parse.urlsplit(spec)
        return BrokerInfo(host=u.hostname or "127.0.0.1", port=u.port or 5672, external=True)
    host, _, port = spec.rpartition(":")
    return BrokerInfo(host=host.strip("[]") or "127.0.0.1", port=int(port), external=True)


def start_warren(tmp: Path, extra_args: list[str]) -> BrokerInfo:
    binary = warren_bin()
    if not binary.is_file():
        pytest.fail(
            f"warren binary not found at {binary}: run `cargo build --bin warren` first "
            "(or set WARREN_BIN)",
            pytrace=False,
        )
    last_log = ""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        data_dir = tmp / f"data-{attempt}"
        log_path = tmp / f"warren-{attempt}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("WARREN_CONFIG", "WARREN_LISTEN", "WARREN_DATA_DIR")}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(binary), "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                 *extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        info = BrokerInfo(host="127.0.0.1", port=port, log_path=log_path, proc=proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                last_log = info.logs()
                low = last_log.lower()
                if "address already in use" in low or "addrinuse" in low or "os error 98" in low:
                    break  # someone took the port: try another
                pytest.fail(f"warren exited during startup ({proc.returncode}):\n{last_log}",
                            pytrace=False)
            if port_open("127.0.0.1", port):
                return info
            if time.monotonic() > deadline:
                stop_warren(info)
                pytest.fail(f"warren did not accept connections on 127.0.0.1:{port} within "
                            f"{STARTUP_TIMEOUT}s:\n{info.logs()}", pytrace=False)
            time.sleep(0.025)
    pytest.fail(f"warren could not bind a free port in {PORT_ATTEMPTS} attempts:\n{last_log}",
                pytrace=False)


def stop_warren(info: BrokerInfo) -> None:
    if info.proc is not None and info.proc.poll() is None:
        info.proc.kill()
        info.proc.wait(timeout=10)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def broker_args() -> list[str]:
    """Extra warren flags; override in a test module to change them."""
    return []


@pytest.fixture
def broker(request, tmp_path, broker_args):
    ext = external_broker()
    if ext is not None:
        yield ext
        return
    info = start_warren(tmp_path, broker_args)
    try:
        yield info
    finally:
        stop_warren(info)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"---- warren log (port {info.port}) ----\n{info.logs()}---- end ----")


@pytest.fixture
def warren_only(broker):
    """Skip a test that needs a Warren this suite spawned (signals, flags)."""
    if broker.external:
        pytest.skip("needs a Warren spawned by the test (AMQP_ADDR points elsewhere)")
    return broker
