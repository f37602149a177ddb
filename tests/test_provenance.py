"""Pinning the model version: the expected root and the manifest's Ed25519 signature, as a node reads
them (butterfly.weights.modelsource) and as butterfly-admin writes and checks them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from butterfly.config import parse_config
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from butterfly.weights.modelsource import NoManifest, load_manifest
from butterfly.weights.provenance import (
    ManifestRefused,
    check_pins,
    generate_key_pair,
    load_private_key,
    sign,
)
from tests.nodeharness import run_admin


@pytest.fixture
def model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "m"))


def _config(model: Path, extra: str = "") -> str:
    return f'[model]\nsource_type = "filesystem"\nsource_path = "{model}"\n{extra}'


def test_check_pins_refuses_another_root_and_a_missing_or_wrong_signature() -> None:
    raw, root = b'{"a manifest":1}\n', "ab" * 32
    pair, other = generate_key_pair(), generate_key_pair()
    good = sign(raw, load_private_key(pair.private_pem))
    check_pins(raw, root, None, expected_root=None, public_key=None, where="m")
    check_pins(raw, root, good, expected_root=root, public_key=pair.public_text, where="m")
    with pytest.raises(ManifestRefused, match=f"m names model version {root}, but .* pins {'cd' * 32}"):
        check_pins(raw, root, good, expected_root="cd" * 32, public_key=None, where="m")
    with pytest.raises(ManifestRefused, match=r"m is not signed \(m.sig is missing\)"):
        check_pins(raw, root, None, expected_root=None, public_key=pair.public_text, where="m")
    with pytest.raises(ManifestRefused, match="not an Ed25519 signature"):
        check_pins(raw, root, b"garbage", expected_root=None, public_key=pair.public_text, where="m")
    with pytest.raises(ManifestRefused, match="signed by another key, or the manifest changed"):
        check_pins(raw, root, good, expected_root=None, public_key=other.public_text, where="m")
    with pytest.raises(ManifestRefused, match="signed by another key, or the manifest changed"):
        check_pins(raw + b" ", root, good, expected_root=None, public_key=pair.public_text, where="m")


def test_a_node_reads_only_the_pinned_and_signed_manifest(model: Path) -> None:
    manifest = read_manifest(model / MANIFEST_FILE)
    where = f"{model}/{MANIFEST_FILE}"
    assert load_manifest(parse_config(_config(model))) == manifest
    pinned = parse_config(_config(model, f'expected_root = "{manifest.merkle_root}"\n'))
    assert load_manifest(pinned) == manifest
    foreign = parse_config(_config(model, f'expected_root = "{"0" * 64}"\n'))
    with pytest.raises(ManifestRefused, match=f"{where} names model version {manifest.merkle_root}"):
        load_manifest(foreign)

    pair = generate_key_pair()
    signed = parse_config(_config(model, f'manifest_public_key = "{pair.public_text}"\n'))
    with pytest.raises(ManifestRefused, match="is not signed"):
        load_manifest(signed)
    sig = model / (MANIFEST_FILE + ".sig")
    sig.write_bytes(
        sign((model / MANIFEST_FILE).read_bytes(), load_private_key(generate_key_pair().private_pem))
    )
    with pytest.raises(ManifestRefused, match="signed by another key"):
        load_manifest(signed)
    sig.write_bytes(sign((model / MANIFEST_FILE).read_bytes(), load_private_key(pair.private_pem)))
    assert load_manifest(signed) == manifest
    (model / MANIFEST_FILE).unlink()
    with pytest.raises(NoManifest, match=f"no manifest at {where}"):
        load_manifest(signed)


def test_admin_show_keygen_sign_and_verify_with_pins(model: Path, tmp_path: Path) -> None:
    manifest = read_manifest(model / MANIFEST_FILE)
    show = run_admin("manifest", "show", str(model))
    assert show.returncode == 0, show.stderr
    assert f"root:     {manifest.merkle_root}" in show.stdout
    assert "signed:   no" in show.stdout
    assert f'expected_root = "{manifest.merkle_root}"' in show.stdout

    key = tmp_path / "signing.pem"
    gen = run_admin("manifest", "keygen", str(key))
    assert gen.returncode == 0, gen.stderr
    assert os.stat(key).st_mode & 0o777 == 0o600
    public = gen.stdout.split('manifest_public_key = "')[1].split('"')[0]
    again = run_admin("manifest", "keygen", str(key))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr

    unsigned = run_admin("manifest", "verify", str(model), "--public-key", public)
    assert unsigned.returncode == 1 and "is not signed" in unsigned.stderr
    signed = run_admin("manifest", "sign", str(model), "--key", str(key))
    assert signed.returncode == 0, signed.stderr
    assert f"signed root {manifest.merkle_root}" in signed.stdout
    assert "signed:   yes" in run_admin("manifest", "show", str(model)).stdout
    ok = run_admin(
        "manifest", "verify", str(model), "--public-key", public, "--expected-root", manifest.merkle_root
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok: the root is the pinned expected_root" in ok.stdout
    assert "ok: signed by the configured manifest_public_key" in ok.stdout
    # The same pins through a node's config, as the node itself would apply them.
    cfg = tmp_path / "node.toml"
    cfg.write_text(_config(model, f'expected_root = "{"1" * 64}"\nmanifest_public_key = "{public}"\n'))
    foreign = run_admin("manifest", "verify", str(model), "--config", str(cfg))
    assert foreign.returncode == 1 and f"but [model] expected_root pins {'1' * 64}" in foreign.stderr
    wrong = run_admin("manifest", "verify", str(model), "--public-key", generate_key_pair().public_text)
    assert wrong.returncode == 1 and "signed by another key" in wrong.stderr
    assert run_admin("manifest", "verify", str(model), "--expected-root", "xyz").returncode == 2
