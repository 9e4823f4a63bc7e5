"""A single-node Apache Kafka broker in KRaft mode, for development, tests and demos.

The broker's jars come from Maven Central (``kafka-pom.xml`` beside this file names
them) and are cached under ``.cache/kafka/libs``; the broker runs with ``java -cp``
on 127.0.0.1 only. Replication factors and ISR minimums are set to one, so
transactions and log compaction work on the single node.

Command line (driven by the Makefile)::

    python -m worker.sandbox.broker fetch    # download the jars once
    python -m worker.sandbox.broker start    # format if new, start, wait for it
    python -m worker.sandbox.broker stop     # stop cleanly (SIGTERM, then SIGKILL)
    python -m worker.sandbox.broker status
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

DEFAULT_PORT = 19092
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
BIND_ATTEMPTS = 6
BIND_RETRY_WAIT_S = 5.0
# One poll of the admin client; short so start-up is noticed within a second.
PROBE_TIMEOUT_S = 1.0

POM_PATH = Path(__file__).with_name("kafka-pom.xml")

LOG4J2_CONFIG = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerError(Exception):
    """The local broker could not be fetched, started or stopped."""


def default_home() -> Path:
    """Return the cache folder: ``$CIO_SANDBOX_HOME`` or ``.cache/kafka`` here."""
    return Path(os.environ.get("CIO_SANDBOX_HOME", ".cache/kafka")).resolve()


@dataclass(frozen=True, slots=True)
class LocalBroker:
    """One broker process with its own data folder, keyed by its port."""

    home: Path
    port: int = DEFAULT_PORT

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def run_dir(self) -> Path:
        return self.home / f"run-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    def fetch(self) -> None:
        """Copy the broker jars into the cache, unless they are there already."""
        marker = self.libs / ".complete"
        if marker.exists():
            return
        if shutil.which("mvn") is None:
            raise BrokerError("Maven (mvn) is needed to fetch the Kafka jars")
        self.libs.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mvn", "-q", "-B", "-f", str(POM_PATH),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.libs}",
                "-DincludeScope=runtime",
            ],
            check=True,
        )  # fmt: skip
        marker.touch()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Format the store if new, start the broker and wait until it answers."""
        if self.is_running():
            self.wait_ready(timeout_s)
            return
        if shutil.which("java") is None:
            raise BrokerError("Java 17 or newer is needed to run the Kafka broker")
        self.fetch()
        config = self._write_config()
        if not (self.run_dir / "data" / "meta.properties").exists():
            self._format(config)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                self._launch(config, timeout_s)
                return
            except BrokerError:
                # A port just released can stay unbindable for a few seconds
                # (connections in TIME_WAIT); try again before giving up.
                if attempt == BIND_ATTEMPTS or not self._bind_failed():
                    raise
                time.sleep(BIND_RETRY_WAIT_S)

    def _bind_failed(self) -> bool:
        log = self.run_dir / "server.log"
        return log.exists() and "Address already in use" in log.read_text()[-20_000:]

    def _launch(self, config: Path, timeout_s: float) -> None:
        # The broker is started through a shell that exits at once, so it
        # outlives this process (the demo and tests stop it by pid) and never
        # lingers as an unreaped child.
        command = " ".join(
            shlex.quote(arg) for arg in [*self._java(), "kafka.Kafka", str(config)]
        )
        log_path = shlex.quote(str(self.run_dir / "stdout.log"))
        launched = subprocess.run(
            ["sh", "-c", f"setsid {command} >>{log_path} 2>&1 </dev/null & echo $!"],
            check=True,
            capture_output=True,
            text=True,
        )
        pid = int(launched.stdout.strip())
        self.pid_file.write_text(str(pid))
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the broker lists its topics, or raise BrokerError."""
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap_servers, "log_level": 0}
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                raise BrokerError(
                    f"broker exited during start-up; see {self.run_dir}/server.log"
                )
            try:
                admin.list_topics(timeout=PROBE_TIMEOUT_S)
                return
            except Exception:
                time.sleep(0.2)
        raise BrokerError(f"broker did not answer within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the broker: SIGTERM for a clean shutdown, SIGKILL if it lingers."""
        pid = self._pid()
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def is_running(self) -> bool:
        pid = self._pid()
        return pid is not None and _alive(pid)

    def wipe(self) -> None:
        """Delete the broker's data folder; the broker must be stopped."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _java(self) -> list[str]:
        return [
            "java",
            "-Xms256m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            f"-Dkafka.logs.dir={self.run_dir}",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            "-cp",
            str(self.libs / "*"),
        ]

    def _format(self, config: Path) -> None:
        result = subprocess.run(
            [
                *self._java(), "kafka.tools.StorageTool", "format",
                "--config", str(config),
                "--cluster-id", _cluster_id(),
                "--ignore-formatted",
            ],
            check=False,
            capture_output=True,
            text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise BrokerError(
                f"formatting {self.run_dir} failed: {result.stderr[-2000:]}"
                f"{result.stdout[-2000:]}"
            )

    def _write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "log4j2.properties").write_text(LOG4J2_CONFIG)
        config = self.run_dir / "server.properties"
        config.write_text(_server_properties(self))
        return config


def _server_properties(broker: LocalBroker) -> str:
    """Single-node KRaft settings; every replication factor is one."""
    host = "127.0.0.1"
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{broker.controller_port}",
        "listeners": (
            f"PLAINTEXT://{host}:{broker.port},CONTROLLER://{host}:"
            f"{broker.controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{host}:{broker.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(broker.run_dir / "data"),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "6",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "6",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "min.insync.replicas": "1",
        "default.replication.factor": "1",
        # Tests create many groups; joining should not wait for late members.
        "group.initial.rebalance.delay.ms": "0",
        # Compaction is exercised by the state topic; run the cleaner promptly.
        "log.cleaner.backoff.ms": "1000",
        "auto.create.topics.enable": "false",
        "message.max.bytes": "10485760",
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def _cluster_id() -> str:
    """A random KRaft cluster id (base64url of 16 bytes, without padding).

    One starting with "-" would be read as an option by the storage tool, so
    such draws are skipped.
    """
    import base64

    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if candidate[0].isalnum():
            return candidate


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); read its state to be sure.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def main(argv: list[str] | None = None) -> int:
    """Run the launcher's command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m worker.sandbox.broker")
    parser.add_argument("command", choices=["fetch", "start", "stop", "status", "wipe"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    broker = LocalBroker(default_home(), args.port)
    try:
        if args.command == "fetch":
            broker.fetch()
        elif args.command == "start":
            broker.start()
            print(f"kafka broker ready at {broker.bootstrap_servers}")
        elif args.command == "stop":
            broker.stop()
        elif args.command == "wipe":
            broker.stop()
            broker.wipe()
        else:
            state = "running" if broker.is_running() else "stopped"
            print(f"kafka broker {state} ({broker.bootstrap_servers})")
            return 0 if state == "running" else 1
    except (BrokerError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
