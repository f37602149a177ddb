"""`butterfly-admin manifest build|verify` and `butterfly-admin clear-cache`: output and exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest

from butterfly.cli.admin import main
from butterfly.weights.cache import WeightCache
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from butterfly.weights.testmodel import make_test_model
from tests.nodeharness import run_admin
from tests.tamper import tamper_with_cheap_digests

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Without its manifest: these tests build one with the command.
    return make_test_model(
        tmp_path_factory.mktemp("admin") / "m",
        layers=4,
        hidden=64,
        heads=4,
        kv_heads=2,
        vocab=1024,
        shards=2,
        manifest=False,
    )


@pytest.fixture
def model(source_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source_model, tmp_path / "m"))


def test_manifest_build_writes_beside_the_model(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "build", str(model), "--chunk-bytes", "64K"]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(model / MANIFEST_FILE)
    assert manifest.chunk_bytes == 64 << 10
    assert f"root:   {manifest.merkle_root}" in out
    assert "units:  6 (embed, 4 blocks, head)" in out
    assert f"bytes:  {sum(f.size for f in manifest.files.values())} in 2 files" in out
    assert "MB/s" in out and str(model / MANIFEST_FILE) in out
    assert not [p for p in model.iterdir() if p.name.startswith(".")]  # the temp file was renamed
    # Building again gives the same file.
    first = (model / MANIFEST_FILE).read_bytes()
    assert main(["manifest", "build", str(model), "--chunk-bytes", "65536"]) == 0
    assert (model / MANIFEST_FILE).read_bytes() == first


def test_manifest_build_usage_and_model_errors(model: Path, tmp_path: Path) -> None:
    assert main(["manifest", "build", str(tmp_path / "nope")]) == 2
    assert main(["manifest", "build", str(model), "--chunk-bytes", "3M"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["manifest", "build", str(model), "--chunk-bytes", "lots"])
    assert exc.value.code == 2
    (model / "config.json").unlink()
    assert main(["manifest", "build", str(model)]) == 1
    assert not (model / MANIFEST_FILE).exists()


def test_manifest_verify(model: Path) -> None:
    assert main(["manifest", "build", str(model)]) == 0
    ok = run_admin("manifest", "verify", str(model))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 2 files, ")
    manifest = read_manifest(model / MANIFEST_FILE)
    t = next(t for t in manifest.tensors if t.name == "model.layers.3.self_attn.v_proj.weight")
    with open(model / t.file, "r+b") as f:
        f.seek(t.offset + 10)
        f.write(b"\x55\xaa")
    bad = run_admin("manifest", "verify", str(model))
    assert bad.returncode == 1
    assert f"{t.file}: tensor '{t.name}': chunk at tensor offset 0 (file offset {t.offset}" in bad.stdout
    assert "does NOT match" in bad.stderr


def test_manifest_verify_catches_bytes_whose_chunk_and_file_digests_were_rewritten(model: Path) -> None:
    # The tampered manifest reads back (its tensor digests, unit digests and root are the real
    # model's), the loader's chunk checks and the file checks pass: only the per-tensor BLAKE3,
    # which the Merkle root covers, tells.
    assert main(["manifest", "build", str(model)]) == 0
    name = "model.layers.2.mlp.gate_proj.weight"
    tamper_with_cheap_digests(model, name)
    manifest = read_manifest(model / MANIFEST_FILE)
    bad = run_admin("manifest", "verify", str(model))
    assert bad.returncode == 1, bad.stdout
    t = next(t for t in manifest.tensors if t.name == name)
    assert f"{t.file}: tensor '{name}' [{t.offset}, {t.offset + t.length}): BLAKE3 " in bad.stdout
    assert f"differs from the manifest's {t.blake3} although every chunk's xxh3 matches" in bad.stdout
    assert f"the manifest names {manifest.merkle_root}" in bad.stdout
    assert "does NOT match" in bad.stderr and "2 problems" in bad.stderr


def test_manifest_verify_with_a_manifest_elsewhere(model: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "manifests" / "v1.json"
    elsewhere.parent.mkdir()
    assert main(["manifest", "build", str(model), "--output", str(elsewhere)]) == 0
    assert not (model / MANIFEST_FILE).exists()
    assert main(["manifest", "verify", str(model)]) == 2  # no manifest beside it
    assert main(["manifest", "verify", str(model), "--manifest", str(elsewhere)]) == 0


def test_manifest_verify_refuses_a_tampered_manifest(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "build", str(model)]) == 0
    path = model / MANIFEST_FILE
    raw = path.read_bytes()
    doc = json.loads(raw)
    root = doc["merkle_root"]
    path.write_bytes(raw.replace(root.encode(), ("0" * 64).encode()))
    capsys.readouterr()
    assert main(["manifest", "verify", str(model)]) == 1
    assert "refusing the manifest" in capsys.readouterr().err


def test_manifest_verify_usage_errors(model: Path, tmp_path: Path) -> None:
    assert main(["manifest", "verify", str(tmp_path / "nope")]) == 2
    assert main(["manifest", "verify", "s3://bucket/model"]) == 2


def _fill_cache(cache_dir: Path, n: int) -> int:
    cache = WeightCache(cache_dir)
    total = 0
    for i in range(n):
        data = bytes([i]) * (1000 * (i + 1))
        cache.store_from_buffer(blake3.blake3(data).hexdigest(), data)
        total += len(data)
    return total


def test_clear_cache(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    total = _fill_cache(cache_dir, 3)
    r = run_admin("clear-cache", "--cache-dir", str(cache_dir), "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("removed ") == 4  # three entries, then the summary
    assert f"removed 3 entries and 0 temp files from {cache_dir}, freed {total} bytes" in r.stdout
    assert WeightCache(cache_dir).stats().entries == 0
    again = run_admin("clear-cache", "--cache-dir", str(cache_dir))
    assert again.returncode == 0 and "removed 0 entries" in again.stdout


def test_clear_cache_refuses_while_a_node_uses_it(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    _fill_cache(cache_dir, 2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from butterfly.weights.cache import lock_shared
                lock = lock_shared(Path({str(cache_dir)!r}))
                print("held", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run_admin("clear-cache", "--cache-dir", str(cache_dir))
        assert r.returncode == 1
        assert "a node is using the cache" in r.stderr
        assert WeightCache(cache_dir).stats().entries == 2
    finally:
        holder.communicate(input="", timeout=60)
    assert run_admin("clear-cache", "--cache-dir", str(cache_dir)).returncode == 0
    assert WeightCache(cache_dir).stats().entries == 0


def test_clear_cache_from_the_node_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_dir = tmp_path / "cache"
    total = _fill_cache(cache_dir, 2)
    config = tmp_path / "node.toml"
    config.write_text(
        '[model]\nsource_type = "filesystem"\nsource_path = "/models/m"\n[node]\ncache_dir = "cache"\n'
    )
    assert main(["clear-cache", "--config", str(config)]) == 0
    assert f"freed {total} bytes" in capsys.readouterr().out
    config.write_text('[node]\ncache_dir = "cache"\n')  # [model] is required
    assert main(["clear-cache", "--config", str(config)]) == 78
    assert main(["clear-cache", "--cache-dir", str(tmp_path / "nope")]) == 0
    assert not (tmp_path / "nope").exists()


def test_clear_cache_without_arguments_uses_the_default_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's fix for a failed validation is a bare `butterfly-admin clear-cache`: it clears the
    cache of the node configured in the default config file."""
    from butterfly.cli import admin_weights

    cache_dir = tmp_path / "cache"
    total = _fill_cache(cache_dir, 2)
    config = tmp_path / "node.toml"
    config.write_text(
        '[model]\nsource_type = "filesystem"\nsource_path = "/models/m"\n[node]\ncache_dir = "cache"\n'
    )
    monkeypatch.setattr(admin_weights, "DEFAULT_CONFIG", str(config))
    assert main(["clear-cache"]) == 0
    assert f"freed {total} bytes" in capsys.readouterr().out
    assert WeightCache(cache_dir).stats().entries == 0
    monkeypatch.setattr(admin_weights, "DEFAULT_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["clear-cache"]) == 78
    assert "missing.toml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["clear-cache", "--config", str(config), "--cache-dir", str(cache_dir)])
    assert exc.value.code == 2


def test_help_texts_agree_with_the_modules() -> None:
    from butterfly.cli import admin_weights
    from butterfly.weights.manifest import DEFAULT_CHUNK_BYTES, MANIFEST_FILE

    assert admin_weights.MANIFEST_FILE_NAME == MANIFEST_FILE
    assert admin_weights.parse_size(admin_weights.DEFAULT_CHUNK_TEXT) == DEFAULT_CHUNK_BYTES
