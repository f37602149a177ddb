"""Test harness: a real dnsmasq serving SRV and address records on 127.0.0.1 at a free port.

dnsmasq runs in the foreground as a child of the test, from a config file in a temp directory:
``--no-resolv --no-hosts`` (it answers only from our records and never forwards anywhere),
``--srv-host`` for the SRV records, ``--host-record`` for fixed targets and an ``--addn-hosts`` file
for targets whose address a test changes. Changing SRV records rewrites the config and restarts
dnsmasq on the same port (dnsmasq reads ``--srv-host`` only at start); changing the hosts file sends
SIGHUP, which makes dnsmasq clear its cache and re-read it -- both are what an operator would do.

Install: Debian's ``dnsmasq-base`` package (the binary only, no service is started). Without it the
tests that need it are skipped, except under CI (``CI`` set), where a missing dnsmasq is a failure:
a green CI must not hide the install step.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

APT_PACKAGE = "dnsmasq-base"


def dnsmasq_binary() -> str:
    """The dnsmasq path; skips the test (fails it under CI) when it is not installed."""
    path = shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None
    )
    if path is None:
        message = f"dnsmasq is not installed (apt-get install -y {APT_PACKAGE})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


@dataclass(frozen=True)
class SrvRecord:
    target: str
    port: int
    priority: int = 0
    weight: int = 10


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1: dnsmasq listens on both."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue  # free for UDP, taken for TCP: draw another
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class Dnsmasq:
    """One dnsmasq; ``start`` it, change its records, ``stop`` it (also on test teardown)."""

    def __init__(self, directory: Path, domain: str = "butterfly.test") -> None:
        self.binary = dnsmasq_binary()
        self.directory = directory
        self.domain = domain
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.hosts_file = directory / "hosts"
        self.log_file = directory / "dnsmasq.log"
        self._srv: dict[str, list[SrvRecord]] = {}
        self._host_records: dict[str, str] = {}

    def start(
        self,
        srv: dict[str, list[SrvRecord]],
        host_records: dict[str, str] | None = None,
        hosts_file: dict[str, str] | None = None,
    ) -> None:
        self._srv = srv
        self._host_records = dict(host_records or {})
        self._write_hosts(hosts_file or {})
        for attempt in range(3):  # another process may take the free port before dnsmasq binds it
            self.port = _free_port()
            try:
                self._launch()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def set_srv(self, srv: dict[str, list[SrvRecord]], host_records: dict[str, str] | None = None) -> None:
        """New SRV records (and fixed host records): rewrite the config and restart on the same port."""
        self._srv = srv
        if host_records is not None:
            self._host_records = dict(host_records)
        self._terminate()
        self._launch()

    def set_hosts(self, hosts_file: dict[str, str]) -> None:
        """New contents of the addn-hosts file, picked up by SIGHUP without a restart."""
        self._write_hosts(hosts_file)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self._terminate()

    # ---- internals -------------------------------------------------------------------------------

    def _write_hosts(self, hosts: dict[str, str]) -> None:
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{address} {name}\n" for name, address in hosts.items()))
        tmp.replace(self.hosts_file)  # dnsmasq never reads a half-written file

    def _config(self) -> str:
        lines = [
            f"port={self.port}",
            "listen-address=127.0.0.1",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            f"addn-hosts={self.hosts_file}",
            f"local=/{self.domain}/",  # never forward a name of ours (there is nowhere to forward to anyway)
            "cache-size=0",
            f"log-facility={self.log_file}",
            f"user={pwd.getpwuid(os.getuid()).pw_name}",
            f"group={grp.getgrgid(os.getgid()).gr_name}",
        ]
        for name, records in self._srv.items():
            lines += [f"srv-host={name},{r.target},{r.port},{r.priority},{r.weight}" for r in records]
        lines += [f"host-record={name},{address}" for name, address in self._host_records.items()]
        return "\n".join(lines) + "\n"

    def _launch(self) -> None:
        conf = self.directory / "dnsmasq.conf"
        conf.write_text(self._config())
        self.process = subprocess.Popen(
            [self.binary, "--keep-in-foreground", f"--conf-file={conf}", "--pid-file="],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 5.0
        query = dns.message.make_query(f"ready.{self.domain}", dns.rdatatype.A)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"dnsmasq exited with {self.process.returncode}: {err.strip()}")
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.1)
                return
            except (dns.exception.Timeout, OSError):
                time.sleep(0.02)
        self._terminate()
        raise RuntimeError("dnsmasq did not answer within 5 s")

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
