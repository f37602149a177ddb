"""`butterfly-admin` commands that write files, on a full disk and on a read-only file system: one line
saying what could not be written, exit 1, no traceback, and nothing half-written left behind."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from butterfly.weights.testmodel import make_test_model
from tests.nodeharness import in_private_mounts, run_admin


def _admin_on_a_full_disk(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a child whose every file write past byte 0 fails (RLIMIT_FSIZE 0: EFBIG, as
    ENOSPC would; Python ignores SIGXFSZ), so nothing it creates can hold a byte."""

    def no_room() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return run_admin(*args, preexec_fn=no_room)


def _one_line_without_traceback(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_secret_create_on_a_full_disk_leaves_no_empty_secret(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    result = _admin_on_a_full_disk("secret", "create", str(key))
    assert result.returncode == 1
    assert _one_line_without_traceback(result) == (
        f"butterfly-admin secret create: cannot write {key}: File too large"
    )
    # An empty file left here made the next `secret create` refuse ("already exists") and every node
    # refuse the secret ("is empty").
    assert not key.exists()


def test_manifest_keygen_on_a_full_disk_says_so_and_leaves_no_empty_key(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    result = _admin_on_a_full_disk("manifest", "keygen", str(key))
    assert result.returncode == 1
    assert _one_line_without_traceback(result) == f"butterfly-admin: cannot write {key}: File too large"
    assert not key.exists()


def test_make_test_model_on_a_full_disk_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = _admin_on_a_full_disk("make-test-model", str(out), "--layers", "2", "--hidden", "64")
    assert result.returncode == 1
    assert _one_line_without_traceback(result) == (
        f"butterfly-admin make-test-model: cannot write {out}: File too large"
    )
    assert list(tmp_path.iterdir()) == []


def test_manifest_sign_on_a_read_only_file_system_says_so(tmp_path: Path) -> None:
    """On a read-only mount unlink fails too (EROFS): the cleanup used to escape as a traceback."""
    model = make_test_model(tmp_path / "src", layers=2, hidden=64, heads=4, kv_heads=2, vocab=256)
    key = tmp_path / "signing.pem"
    keygen = run_admin("manifest", "keygen", str(key))
    assert keygen.returncode == 0, keygen.stderr
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (
        f'mount -t tmpfs tmpfs "{mount}" && cp -r "{model}" "{mount}/m" && mount -o remount,ro "{mount}" && '
        f'exec "{sys.executable}" -m butterfly.cli.admin manifest sign "{mount}/m" --key "{key}"'
    )
    result = in_private_mounts(script)
    assert result.returncode == 1, result.stderr
    assert _one_line_without_traceback(result) == (
        f"butterfly-admin: cannot write {mount}/m/butterfly-manifest.json.sig: Read-only file system"
    )
