"""The packaged service: units, the .deb and .rpm, and butterfly-node under a real systemd.

The packages are built once per session by packaging/build.sh (reused from dist/ when they are
newer than every source file that goes into them) and then installed into a throwaway systemd
booted as PID 1 of new namespaces (tests/systemdharness.py), where the node runs exactly as an
operator would run it: `dpkg -i`, edit /etc/butterfly/node.toml, `systemctl start butterfly-node`.

Needs root, util-linux and systemd (skipped otherwise, saying which), plus lintian and rpm, and
network access to PyPI for the build.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from butterfly.config import Config, ConfigError, NodeConfig, parse_config
from tests.systemdharness import SystemdContainer, unavailable_reason, wait_until

REPO = Path(__file__).resolve().parent.parent
# scripts/test.sh points this at its temp dir, so a test run leaves no packages behind.
DIST = Path(os.environ.get("BUTTERFLY_DIST_DIR") or REPO / "dist")
# Tests that need the packages: the first builds them (a few minutes: the environment bundles torch)
# and lintian then reads a ~250 MB .deb, which takes minutes on a busy 2-core machine.
PACKAGE_TEST_TIMEOUT_S = 1800
UNIT = "butterfly-node.service"
# Everything packaging/build.sh puts into the packages; a newer file here means a rebuild.
BUILD_INPUTS = ("butterfly", "csrc", "systemd", "packaging", "pyproject.toml", "setup.py", "README.md")

SYSTEMD_MISSING = unavailable_reason()
needs_systemd = pytest.mark.skipif(SYSTEMD_MISSING is not None, reason=SYSTEMD_MISSING or "")


# ---- the packages ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path


def _newest_input() -> float:
    newest = 0.0
    for name in BUILD_INPUTS:
        top = REPO / name
        paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for path in paths:
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".so", ".c"):
                continue
            newest = max(newest, path.stat().st_mtime)
    return newest


def _built() -> Packages | None:
    debs = sorted(DIST.glob("butterfly-node_*.deb"))
    rpms = sorted(DIST.glob("butterfly-node-*.rpm"))
    if len(debs) != 1 or len(rpms) != 1:
        return None
    return Packages(debs[0], rpms[0])


@pytest.fixture(scope="session")
def packages() -> Packages:
    """dist/'s packages, built by packaging/build.sh unless they are newer than their sources
    (delete dist/ to force a build). A file lock makes parallel test workers build once and share
    the result.
    """
    if SYSTEMD_MISSING is not None:
        pytest.skip(SYSTEMD_MISSING)
    lock_path = REPO / "build" / "packaging.lock"
    lock_path.parent.mkdir(exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _built()
        if built is not None and min(built.deb.stat().st_mtime, built.rpm.stat().st_mtime) > _newest_input():
            return built
        log = REPO / "build" / "packaging-build.log"
        with open(log, "wb") as out:
            proc = subprocess.run(
                [str(REPO / "packaging" / "build.sh")], stdout=out, stderr=subprocess.STDOUT, timeout=900
            )
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, f"packaging/build.sh failed ({proc.returncode}):\n{text[-4000:]}"
        built = _built()
        assert built is not None, f"packaging/build.sh left no packages in {DIST}:\n{text[-2000:]}"
        return built


def _tool(name: str, apt_package: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is needed for this test: apt-get install {apt_package}"
    return path


# ---- units and the default configuration (no build needed) --------------------------------------


@needs_systemd
def test_units_pass_systemd_analyze_verify() -> None:
    # verify insists that ExecStart= exists; give it a stand-in at the packaged path inside a
    # private mount namespace (a tmpfs over /opt that only this command sees).
    script = (
        "mount -t tmpfs tmpfs /opt && mkdir -p /opt/butterfly/venv/bin"
        " && printf '#!/bin/sh\\n' >/opt/butterfly/venv/bin/butterfly-node"
        " && chmod 755 /opt/butterfly/venv/bin/butterfly-node"
        ' && exec systemd-analyze verify --man=no "$@"'
    )
    units = [str(REPO / "systemd" / UNIT), str(REPO / "systemd" / "butterfly-node@.service")]
    # The template is checked through an instance of it, as systemd would load it.
    units.append(str(REPO / "systemd" / "butterfly-node@a.service"))
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "_", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "butterfly" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_template_unit_differs_from_the_main_unit_only_in_the_instance_paths() -> None:
    main = (REPO / "systemd" / UNIT).read_text()
    template = (REPO / "systemd" / "butterfly-node@.service").read_text()
    body = main[main.index("[Unit]") :]
    for old, new in (
        ("Description=Butterfly inference cluster node", "Description=Butterfly inference cluster node %i"),
        ("--config /etc/butterfly/node.toml", "--config /etc/butterfly/%i.toml"),
        ("EnvironmentFile=-/etc/butterfly/node.env", "EnvironmentFile=-/etc/butterfly/%i.env"),
    ):
        body = body.replace(old, new)
    assert template[template.index("[Unit]") :] == body, "edit both units alike (only %i paths differ)"


def test_unit_keeps_its_contract() -> None:
    unit = (REPO / "systemd" / UNIT).read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure" and settings["RestartPreventExitStatus"] == "78"
    assert settings["KillMode"] == "mixed" and settings["ProtectSystem"] == "strict"
    # Each of these would hide or block /dev/shm or the GPU device nodes.
    for setting in ("PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy", "PrivateIPC"):
        assert setting not in settings, f"{setting}= breaks shared memory or GPU access"


def _uncomment_all(text: str) -> tuple[str, set[str]]:
    """The packaged node.toml with every documented key switched on; also the keys already on."""
    active = {m.group(1) for m in re.finditer(r"^([a-z_]+) = ", text, re.M)}
    text = re.sub(r"^# (\[[a-z0-9_.]+\])$", r"\1", text, flags=re.M)
    text = re.sub(r"^# ([a-z_]+ = .*)$", r"\1", text, flags=re.M)
    return text, active


def test_default_config_documents_every_key_with_its_default() -> None:
    shipped = (REPO / "packaging" / "node.toml").read_text()
    # As shipped it must refuse to start until the operator names the model.
    with pytest.raises(ConfigError, match="model.source_type"):
        parse_config(shipped, "node.toml")
    text, active = _uncomment_all(shipped)
    config = parse_config(text, "node.toml (all keys uncommented)")
    # Where the operator documentation has an operator look (`df -h /var/butterfly/models`), which
    # is also the built-in default, and the unit's ReadWritePaths=.
    assert str(config.node.cache_dir) == "/var/butterfly/models"
    assert config.node.cache_dir == NodeConfig.__dataclass_fields__["cache_dir"].default
    unit = (REPO / "systemd" / UNIT).read_text()
    assert "\nReadWritePaths=-/var/butterfly/models\n" in unit
    assert "\nCacheDirectory=" not in unit
    assert str(config.logging.file) == "/var/log/butterfly/node.log"

    def walk(table: object, prefix: str) -> Iterator[tuple[str, dataclasses.Field[object], object]]:
        for f in dataclasses.fields(table):  # type: ignore[arg-type]
            value = getattr(table, f.name)
            if "table" in f.metadata:
                yield from walk(value, f"{prefix}{f.name}.")
            elif "check" in f.metadata:
                yield f"{prefix}{f.name}", f, value

    for key, f, value in walk(config, ""):
        name = key.rsplit(".", 1)[-1]
        assert re.search(rf"^(# )?{name} = ", shipped, re.M), f"packaging/node.toml does not document {key}"
        if f.default not in (dataclasses.MISSING, None) and name not in active:
            assert value == f.default, (
                f"packaging/node.toml shows {key} = {value!r}, the default is {f.default!r}"
            )
    assert isinstance(config, Config)


# ---- the packages themselves --------------------------------------------------------------------


@needs_systemd
@pytest.mark.timeout(PACKAGE_TEST_TIMEOUT_S)
def test_deb_is_lintian_clean(packages: Packages) -> None:
    lintian = _tool("lintian", "lintian")
    proc = subprocess.run(
        [lintian, "--fail-on", "error,warning", "--no-tag-display-limit", str(packages.deb)],
        capture_output=True,
        text=True,
        timeout=PACKAGE_TEST_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_systemd
@pytest.mark.timeout(PACKAGE_TEST_TIMEOUT_S)
def test_rpm_contents_scripts_and_scratch_root_install(packages: Packages, tmp_path: Path) -> None:
    rpm = _tool("rpm", "rpm")

    def query(*args: str) -> str:
        return subprocess.run(
            [rpm, "-qp", *args, str(packages.rpm)], capture_output=True, text=True, check=True
        ).stdout

    files = set(query("-l").splitlines())
    for path in (
        "/opt/butterfly/venv/bin/butterfly-node",
        "/usr/bin/butterfly-node",
        "/usr/bin/butterfly-admin",
        "/usr/lib/systemd/system/butterfly-node.service",
        "/usr/lib/systemd/system/butterfly-node@.service",
        "/usr/lib/sysusers.d/butterfly.conf",
        "/usr/lib/tmpfiles.d/butterfly.conf",
        "/etc/butterfly/node.toml",
    ):
        assert path in files, f"{path} missing from the rpm"
    assert not any(p.startswith("/lib/") for p in files), "rpm units belong in /usr/lib"
    # torch is the engine, a core dependency bundled as its pinned CPU wheel; CuPy is the optional
    # `gpu` extra and stays out unless BUTTERFLY_PKG_EXTRAS asks for it.
    assert any("/site-packages/torch/" in p for p in files), "the engine's torch is missing from the rpm"
    assert not any("/site-packages/cupy" in p for p in files), "cupy is the optional gpu extra"
    assert "/etc/butterfly/node.toml" in query("--configfiles").splitlines()
    scripts = query("--scripts")
    for scriptlet in ("postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"):
        assert scriptlet in scripts
    assert "systemd-sysusers" in scripts and "/etc/butterfly/cluster.key" in scripts
    assert "[ -d /run/systemd/system ]" in scripts
    requires = query("--requires")
    assert "/usr/bin/python3.11" in requires and "glibc >=" in requires

    # Unpacked into a scratch root (the scriptlets need a whole system: they run for real in the
    # systemd test below), the environment works from wherever it lies.
    root = tmp_path / "root"
    subprocess.run(
        [rpm, "--root", str(root), "--nodeps", "--noscripts"]
        + (["--force-debian"] if Path("/etc/debian_version").exists() else [])
        + ["-i", str(packages.rpm)],
        capture_output=True,
        text=True,
        check=True,
    )
    python = root / "opt/butterfly/venv/bin/python"
    out = subprocess.run(
        [str(python), "-m", "butterfly.cli.node", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"butterfly-node {packages.rpm.name.split('-')[2]}"
    assert (root / "etc/butterfly/node.toml").read_text() == (REPO / "packaging/node.toml").read_text()
    assert os.readlink(root / "usr/bin/butterfly-node") == "/opt/butterfly/venv/bin/butterfly-node"


# ---- the node under a real systemd --------------------------------------------------------------

HOLD_DIR = "/run/butterfly-test"
DROP_IN = f"""[Service]
# The loader pauses mid-download while {HOLD_DIR}/hold-loading_weights exists.
Environment=BUTTERFLY_TEST_HOLD_DIR={HOLD_DIR}
# Short enough for the test to watch a hung node being killed and restarted.
WatchdogSec=4s
TimeoutAbortSec=5s
RestartSec=1s
LimitCORE=0
"""


def _node_config(shipped: str) -> str:
    """The packaged node.toml as an operator would edit it for one node on its own."""
    edits = {
        '# source_type = "filesystem"': 'source_type = "filesystem"',
        '# source_path = "/srv/models/llama-70b"': 'source_path = "/srv/model"',
        '# id = "node-a"': 'id = "ns-node"',
        '# role = "worker"': 'role = "coordinator"',
        "# quorum_size = 1": "quorum_size = 1",
        '# bind_address = "0.0.0.0:7000"': 'bind_address = "127.0.0.1:7000"',
    }
    for old, new in edits.items():
        assert old in shipped, f"packaging/node.toml no longer has {old!r}"
        shipped = shipped.replace(old, new)
    return shipped


@pytest.fixture
def container(packages: Packages, tmp_path: Path) -> Iterator[SystemdContainer]:
    with SystemdContainer.boot(tmp_path / "container", packages.deb.parent) as c:
        yield c


STATUS_URL = "http://127.0.0.1:8080/status"
# The weight cache, where the operator documentation looks for it.
CACHE = "/var/butterfly/models"
# Lists the processes of the service user inside the container.
BUTTERFLY_PROCESSES = (
    'for p in /proc/[0-9]*; do [ "$(stat -c %U "$p" 2>/dev/null)" = butterfly ] && echo "$p"; done; true'
)


def _status(c: SystemdContainer) -> str:
    """The node's /status, read from inside the container (its network namespace has only lo)."""
    code = f"import urllib.request as u; print(u.urlopen({STATUS_URL!r}, timeout=2).read().decode())"
    return c.run("python3", "-c", code, check=False).stdout


@needs_systemd
@pytest.mark.timeout(PACKAGE_TEST_TIMEOUT_S)
def test_node_as_a_systemd_service(container: SystemdContainer, packages: Packages) -> None:
    c = container
    deb = f"/opt/under-test/{packages.deb.name}"

    # -- install: account, directories, secret, units; nothing started yet
    c.run("dpkg", "-i", deb)
    assert c.run("id", "-un", "butterfly").stdout.strip() == "butterfly"
    assert c.run("stat", "-c", "%a %U %G", "/etc/butterfly/cluster.key").stdout.split() == [
        "640",
        "root",
        "butterfly",
    ]
    key = c.read("/etc/butterfly/cluster.key")
    assert re.fullmatch(r"[0-9a-f]{64}\n", key), "the secret is 32 random bytes in hex"
    for d in ("/var/lib/butterfly", CACHE, "/var/log/butterfly"):
        assert c.run("stat", "-c", "%a %U", d).stdout.split() == ["750", "butterfly"], d
    # Only the cache below it is the service user's.
    assert c.run("stat", "-c", "%a %U", "/var/butterfly").stdout.split() == ["755", "root"]
    assert not c.exists("/var/cache/butterfly"), "the cache's old place is no longer made"
    conffiles = c.run("dpkg-query", "-W", "-f=${Conffiles}", "butterfly-node").stdout
    assert "/etc/butterfly/node.toml" in conffiles and "/etc/logrotate.d/butterfly-node" in conffiles
    c.run("systemd-analyze", "verify", UNIT, "butterfly-node@a.service")
    assert c.run("butterfly-node", "--version").stdout.startswith("butterfly-node ")
    assert c.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"

    # -- configure: a generated model, the shipped config edited for one coordinator
    c.run(
        "butterfly-admin",
        "make-test-model",
        "/srv/model",
        "--layers",
        "4",
        "--hidden",
        "256",
        "--vocab",
        "2048",
    )
    # The model version a node loads is named by its manifest, built once by the operator.
    c.run("butterfly-admin", "manifest", "build", "/srv/model")
    c.run("chmod", "-R", "a+rX", "/srv/model")
    good_config = _node_config(c.read("/etc/butterfly/node.toml"))
    c.write("/etc/butterfly/node.toml", good_config)
    c.run("mkdir", "-p", f"/etc/systemd/system/{UNIT}.d", HOLD_DIR)
    c.write(f"/etc/systemd/system/{UNIT}.d/test.conf", DROP_IN)
    c.run("touch", f"{HOLD_DIR}/hold-loading_weights")
    c.run("systemctl", "daemon-reload")

    # -- start: activating while loading, with the supervisor's STATUS= text
    c.run("systemctl", "start", "--no-block", UNIT)
    wait_until(
        lambda: "loading_weights" in c.show(UNIT, "StatusText")["StatusText"],
        60,
        "STATUS= in loading_weights",
    )
    for _ in range(5):  # held: it must stay activating, however long loading takes
        state = c.show(UNIT, "ActiveState", "SubState")
        assert state == {"ActiveState": "activating", "SubState": "start"}, state
        assert '"state":"LOADING"' in _status(c).replace(" ", "")
        time.sleep(0.3)
    status = c.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    assert re.search(r'Status: "LOADING loading_weights', status), status

    # -- journal: one structured entry per phase change
    entries = c.journal("-u", UNIT, "PHASE=loading_weights")
    phase_lines = [e for e in entries if "-> loading_weights" in e["MESSAGE"]]
    assert phase_lines, f"no phase line in {entries}"
    assert phase_lines[0]["STATE"] == "LOADING" and phase_lines[0]["NODE_ID"] == "ns-node"
    assert int(phase_lines[0]["TERM"]) >= 1

    # -- READY=1: only then active
    released = time.time()
    c.run("rm", f"{HOLD_DIR}/hold-loading_weights")
    wait_until(lambda: c.show(UNIT, "ActiveState")["ActiveState"] == "active", 60, "the unit to turn active")
    # STATUS= is refreshed by the supervisor's health loop, a moment after READY=1.
    wait_until(
        lambda: c.show(UNIT, "StatusText")["StatusText"].startswith(("READY", "OPERATIONAL")),
        10,
        "STATUS= to say READY or OPERATIONAL",
    )
    started = [e for e in c.journal("-u", UNIT, "JOB_TYPE=start", "JOB_RESULT=done")]
    assert len(started) == 1 and int(started[0]["__REALTIME_TIMESTAMP"]) / 1e6 >= released
    wait_until(lambda: '"state":"OPERATIONAL"' in _status(c).replace(" ", ""), 30, "OPERATIONAL")

    # -- the weight cache: the node, as installed and as the unit confines it, writes it under
    # /var/butterfly/models (behind the load, once OPERATIONAL), and nowhere else is writable
    def node_log() -> str:
        return "\n".join(e["MESSAGE"] for e in c.journal("-u", UNIT))

    wait_until(lambda: "tensors behind the load" in node_log(), 60, "the write-behind to the cache")
    cached = re.search(r"cached (\d+) tensors behind the load \((\d+) could not be\)", node_log())
    assert cached and int(cached[1]) > 0 and cached[2] == "0", node_log()[-3000:]
    assert "cannot lock the weight cache" not in node_log()
    entries = c.sh(f"find {CACHE}/blake3 -type f -printf '%u\\n'").stdout.split()
    assert entries and set(entries) == {"butterfly"}, entries  # (equal tensors share an entry)
    assert c.run("stat", "-c", "%U", f"{CACHE}/.lock").stdout.strip() == "butterfly"
    hardening = c.show(UNIT, "ProtectSystem", "ReadWritePaths", "User")
    assert hardening["ProtectSystem"] == "strict" and hardening["User"] == "butterfly", hardening
    assert f"-{CACHE}" in hardening["ReadWritePaths"].split(), hardening
    # Inside the node's own mount namespace (as root, which a read-only mount stops too): the cache
    # is writable, its parent and the rest of /var are not.
    in_node = ["nsenter", "-t", c.show(UNIT, "MainPID")["MainPID"], "-m", "--"]
    c.run(*in_node, "sh", "-c", f"touch {CACHE}/.probe && rm {CACHE}/.probe")
    for ro in ("/var/butterfly/.probe", "/var/cache/.probe", "/var/.probe"):
        denied = c.run(*in_node, "touch", ro, check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (ro, denied)

    # -- the seed's log file, reopened on `systemctl reload` (what logrotate's postrotate runs)
    assert "phase=loading_weights" in c.read("/var/log/butterfly/node.log")
    main_pid = c.show(UNIT, "MainPID")["MainPID"]
    c.run("mv", "/var/log/butterfly/node.log", "/var/log/butterfly/node.log.1")
    c.run("systemctl", "reload", UNIT)
    wait_until(lambda: c.exists("/var/log/butterfly/node.log"), 10, "a fresh node.log after reload")
    assert c.show(UNIT, "MainPID", "ActiveState") == {"MainPID": main_pid, "ActiveState": "active"}

    # -- watchdog: a hung supervisor is killed and the node restarted
    restarts = int(c.show(UNIT, "NRestarts")["NRestarts"])
    c.run("kill", "-STOP", main_pid)
    wait_until(
        lambda: (
            (s := c.show(UNIT, "NRestarts", "MainPID", "ActiveState"))["NRestarts"] == str(restarts + 1)
            and s["MainPID"] not in ("0", main_pid)
            and s["ActiveState"] == "active"
        ),
        60,
        "the watchdog to restart the hung node",
    )
    assert c.journal("-u", UNIT, "UNIT_RESULT=watchdog"), "systemd did not record a watchdog timeout"
    assert not c.exists(f"/proc/{main_pid}"), "the hung process survived"
    dumped = "\n".join(e["MESSAGE"] for e in c.journal("-u", UNIT, f"_PID={main_pid}"))
    assert "Fatal Python error: Aborted" in dumped, "no faulthandler traceback of the hung node"

    # -- graceful stop: SIGTERM to the supervisor, exit 0, nothing left behind
    t0 = time.monotonic()
    c.run("systemctl", "stop", UNIT)
    assert time.monotonic() - t0 < 20
    # Status 0, not 15: the supervisor shut down and exited by itself, it was not killed.
    stopped = {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert c.show(UNIT, *stopped) == stopped
    assert any(e["MESSAGE"].startswith("stopped") for e in c.journal("-u", UNIT, "-n", "20"))
    left = c.sh(BUTTERFLY_PROCESSES)
    assert left.stdout.strip() == "", f"processes of the butterfly user left: {left.stdout}"
    assert c.sh("ls /dev/shm | grep butterfly- || true").stdout == ""

    # -- a config error: failed with status 78, and not restarted
    c.write("/etc/butterfly/node.toml", good_config + "\n[bogus]\nkey = 1\n")
    restarts = int(c.show(UNIT, "NRestarts")["NRestarts"])
    assert c.run("systemctl", "start", UNIT, check=False).returncode != 0
    failed = {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78"}
    assert c.show(UNIT, *failed) == failed
    time.sleep(3.5)  # three RestartSec= periods
    assert c.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": str(restarts)}
    assert any("config error" in e["MESSAGE"] for e in c.journal("-u", UNIT, "-n", "20"))
    c.write("/etc/butterfly/node.toml", good_config)
    c.run("systemctl", "reset-failed", UNIT)

    # -- a removed cache directory is made again (for the service user) before the node starts
    c.run("rm", "-rf", CACHE)
    # -- upgrade (a reinstall) restarts a running node; the edited config and the secret stay
    c.run("systemctl", "start", UNIT)  # returns at READY=1
    assert c.run("stat", "-c", "%a %U", CACHE).stdout.split() == ["750", "butterfly"]
    before = c.show(UNIT, "MainPID")["MainPID"]
    c.run("dpkg", "-i", deb)
    assert c.read("/etc/butterfly/node.toml") == good_config
    assert c.read("/etc/butterfly/cluster.key") == key
    after = c.show(UNIT, "MainPID", "ActiveState")
    assert after["ActiveState"] == "active" and after["MainPID"] not in ("0", before), after

    # -- remove stops the node and keeps configuration, secret and state; purge deletes them
    c.run("dpkg", "-r", "butterfly-node")
    assert c.sh(BUTTERFLY_PROCESSES).stdout.strip() == "", "dpkg -r left the node running"
    assert not c.exists("/opt/butterfly/venv") and not c.exists("/usr/bin/butterfly-node")
    for kept in ("/etc/butterfly/node.toml", "/etc/butterfly/cluster.key", "/var/lib/butterfly"):
        assert c.exists(kept), f"dpkg -r removed {kept}"
    assert c.run("systemctl", "cat", UNIT, check=False).returncode != 0
    c.run("dpkg", "-P", "butterfly-node")
    for gone in ("/etc/butterfly", "/var/lib/butterfly", "/var/butterfly", "/var/log/butterfly"):
        assert not c.exists(gone), f"dpkg -P left {gone}"

    # -- the rpm's scriptlets, for real: account, secret, units; erase keeps secret and state
    rpm = ["rpm", "--nodeps", "--force-debian"] if c.exists("/etc/debian_version") else ["rpm", "--nodeps"]
    c.run(*rpm, "-i", f"/opt/under-test/{packages.rpm.name}")
    assert c.run("stat", "-c", "%a %G", "/etc/butterfly/cluster.key").stdout.split() == ["640", "butterfly"]
    assert "ExecStart=/opt/butterfly/venv/bin/butterfly-node" in c.run("systemctl", "cat", UNIT).stdout
    assert c.run("butterfly-node", "--version").returncode == 0
    c.run(*rpm, "-e", "butterfly-node")
    assert not c.exists("/opt/butterfly/venv")
    assert c.exists("/etc/butterfly/cluster.key") and c.exists("/var/lib/butterfly")
