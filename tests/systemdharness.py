"""A throwaway systemd, booted as PID 1 of new namespaces, for tests of the packaged service.

``SystemdContainer.boot(state_dir, bind_dir)`` starts ``/lib/systemd/systemd`` as PID 1 of new
PID, mount, UTS, IPC, network and cgroup namespaces over an overlay of the host's root (writes land
in a tmpfs and vanish with it), with ``bind_dir`` mounted read-only at ``/opt/under-test``. The
test then drives it with ``nsenter -t PID -a`` (``run``, ``systemctl``, ``show``, ``journal``).
``stop()`` powers it off, kills what is left, and removes the cgroup and the state directory, so
nothing of it outlives the test; it is also what ``__exit__`` does.

What keeps the host safe (after /work/shared/recipes/systemd-ns): /proc/sys is read-only, /sys too,
CAP_SYS_TIME, CAP_SYS_MODULE and friends are dropped from the bounding set, units that would touch
the host's clock, kernel or package database (timesyncd, sysctl, modules, apt/dpkg timers) are
masked, the host's /tmp is never bound (boot wipes /tmp), and the container's network namespace
has only ``lo``. Needs root, util-linux's unshare/nsenter and systemd; cgroup resource controllers
are not available inside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

SYSTEMD = Path("/lib/systemd/systemd")
T = TypeVar("T")

# Units masked inside: each could change the host (clock, kernel, sysfs) or take the dpkg lock
# while a test installs packages.
MASKED = (
    "systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service "
    "proc-sys-fs-binfmt_misc.automount systemd-timesyncd.service systemd-firstboot.service "
    "systemd-random-seed.service systemd-repart.service systemd-pcrphase.service "
    "systemd-pcrphase-sysinit.service systemd-pstore.service e2scrub_reap.service postgresql.service "
    "apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer "
    "man-db.timer"
)

# Runs as PID 1 of the new namespaces: builds the container's root, then becomes systemd.
STAGE2 = r"""#!/bin/bash
set -euo pipefail
S=$1; BIND=$2; MASKED=$3; R=$S/root
mount -t tmpfs -o mode=755 tmpfs "$S/ovl"    # the overlay's upper layer must be a file system of its own
mkdir "$S/ovl/upper" "$S/ovl/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/ovl/upper,workdir=$S/ovl/work" "$R"
mount -t proc proc "$R/proc"
# Never let the container tune the host's kernel.
mount --bind "$R/proc/sys" "$R/proc/sys"; mount -o remount,bind,ro "$R/proc/sys"
if [ -e "$R/proc/sysrq-trigger" ]; then mount --bind /dev/null "$R/proc/sysrq-trigger"; fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mkdir "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$R/dev/${i#*:}"; done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t mqueue mqueue "$R/dev/mqueue"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"    # never the host's /tmp: boot wipes it
mkdir -p "$R/opt/under-test"
mount --bind "$BIND" "$R/opt/under-test"; mount -o remount,bind,ro "$R/opt/under-test"
E=$R/etc/systemd/system
cat >"$E/butterfly-test.target" <<'T'
[Unit]
Description=Minimal boot target for Butterfly's systemd tests
Requires=basic.target
After=basic.target
AllowIsolate=yes
T
for u in $MASKED; do ln -sf /dev/null "$E/$u"; done
echo butterfly-test >"$R/etc/hostname"; hostname butterfly-test
cd "$R"; mkdir -p oldroot; pivot_root . oldroot; cd /; umount -l /oldroot; rmdir /oldroot
exec setpriv --bounding-set -sys_module,-sys_time,-wake_alarm,-sys_rawio,-mac_admin,-mac_override,-syslog \
  env -i container=butterfly-test TERM=dumb PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=butterfly-test.target --show-status=no
"""


def cgroup2_root() -> Path | None:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hosts
    with the hybrid layout; None without one."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.controllers").exists():
            return root
    return None


def unavailable_reason() -> str | None:
    """Why a real systemd cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: booting systemd in new namespaces (CI runs as root)"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not SYSTEMD.exists() or shutil.which("systemctl") is None:
        return "systemd is not installed"
    if cgroup2_root() is None:
        return "needs a cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    return None


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something other than None/False; fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class SystemdContainer:
    def __init__(
        self, state_dir: Path, cgroup: Path, unshare: subprocess.Popen[bytes], init_pid: int
    ) -> None:
        self.state_dir = state_dir
        self.cgroup = cgroup
        self.unshare = unshare
        self.pid = init_pid
        self._log = state_dir / "boot.log"

    @classmethod
    def boot(cls, state_dir: Path, bind_dir: Path, timeout: float = 30.0) -> SystemdContainer:
        state_dir.mkdir(parents=True)
        (state_dir / "root").mkdir()
        (state_dir / "ovl").mkdir()
        stage2 = state_dir / "stage2.sh"
        stage2.write_text(STAGE2)
        stage2.chmod(0o755)
        # Its own cgroup, so the container's systemd manages a subtree of its own that is removed
        # whole at the end.
        root = cgroup2_root()
        assert root is not None, "no cgroup2 hierarchy"
        cgroup = root / f"butterfly-systemd-test-{os.getpid()}-{time.monotonic_ns()}"
        cgroup.mkdir()
        log = open(state_dir / "boot.log", "wb")  # noqa: SIM115 - the child holds it; closed below
        try:
            unshare = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    'echo $$ >"$1/cgroup.procs" && shift && exec "$@"',
                    "_",
                    str(cgroup),
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--net",
                    "--cgroup",
                    "--propagation",
                    "private",
                    "--",
                    str(stage2),
                    str(state_dir),
                    str(bind_dir),
                    MASKED,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        container = cls(state_dir, cgroup, unshare, 0)
        try:
            container.pid = wait_until(container._find_init, timeout, "systemd to start as PID 1")
            wait_until(container._booted, timeout, "the container's systemd to finish booting")
        except BaseException:
            container.stop()
            raise
        return container

    def _find_init(self) -> int | None:
        if self.unshare.poll() is not None:
            raise AssertionError(f"the container exited while booting:\n{self.boot_log()}")
        for child in Path(f"/proc/{self.unshare.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except OSError:
                    continue
        return None

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def boot_log(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ---- driving it ---------------------------------------------------------------------------

    def run(
        self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces, its root)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                f"stderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'cat >"$1"', "_", path, input=text)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries as dicts (``journalctl -o json ARGS``); ``MESSAGE`` decoded to text."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        entries = []
        for line in out.splitlines():
            entry = json.loads(line)
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # non-UTF-8 or binary messages come as byte arrays
                entry["MESSAGE"] = bytes(message).decode("utf-8", "replace")
            entries.append(entry)
        return entries

    # ---- tearing it down ----------------------------------------------------------------------

    def stop(self) -> None:
        """Power off, kill what is left, remove the cgroup and the state directory. Idempotent."""
        if self.unshare.poll() is None and self.pid:
            subprocess.run(
                ["nsenter", "-t", str(self.pid), "-a", "systemctl", "poweroff", "--no-block"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            try:
                self.unshare.wait(15)
            except subprocess.TimeoutExpired:
                pass
        if self.unshare.poll() is None:
            # Killing a PID namespace's init ends every process in it.
            for pid in (self.pid, self.unshare.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.unshare.wait(15)
        self._remove_cgroup()
        # The container's mounts lived in its own mount namespace and are gone with it; what is
        # left are the empty mount points and the logs.
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                for d in sorted(
                    (p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
                ):
                    d.rmdir()
                self.cgroup.rmdir()
                return
            except OSError:
                # Processes take a moment to leave a cgroup after they were killed.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> SystemdContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
