"""Which model version a node accepts: the root an operator pinned, and the manifest's signature.

A manifest proves that bytes belong to the model version its Merkle root names; it cannot say that
this is the version the operator meant. Whoever can replace the weights can replace the manifest
beside them. Two optional pins close that:

* ``[model] expected_root``: the root the operator approved (``butterfly-admin manifest show`` prints
  it); a manifest naming any other root is refused.
* ``[model] manifest_public_key``: an Ed25519 public key; the manifest must then come with a
  signature file (``<manifest>.sig``, written by ``butterfly-admin manifest sign``) over its exact
  bytes by the matching private key. An unsigned or wrongly signed manifest is refused. (The
  canonical encoding makes the bytes a function of the content, so signing the bytes signs the
  content.)

Owns: the key and signature formats (raw Ed25519 keys and signatures, base64 in text), generating
a key pair, signing, and the one check every reader of a manifest runs (``check_pins``). Built on
``cryptography``, imported only where a key is used (every child process imports this module, most
nodes configure no key); nothing here is hand-rolled cryptography.

Must not: read files or sources (callers hand it bytes), or decide what a refusal does to the node.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SIGNATURE_SUFFIX",
    "KeyPair",
    "ManifestRefused",
    "check_pins",
    "generate_key_pair",
    "is_root",
    "load_private_key",
    "parse_public_key",
    "public_key_text",
    "sign",
]

SIGNATURE_SUFFIX = ".sig"
# A signature file is one line of base64 (64 raw bytes); anything much longer is not one.
MAX_SIGNATURE_BYTES = 1024
_ROOT = re.compile(r"[0-9a-f]{64}")


class ManifestRefused(Exception):
    """A well-formed manifest this node must not use: another root than the pinned one, or not signed
    by the configured key. The message says which and how to fix it."""


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The key from its config form: base64 of the 32 raw bytes. ValueError says what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, an Ed25519 public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    """PKCS#8 PEM, unencrypted: keep it off the nodes (they need only the public key)."""
    public_text: str
    """What goes into ``[model] manifest_public_key``."""


def generate_key_pair() -> KeyPair:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(pem, public_key_text(key.public_key()))


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM; ValueError for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"a {type(key).__name__}, not an Ed25519 private key")
    return key


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature file's contents for ``manifest_bytes``: base64 of the raw signature, one line."""
    return base64.b64encode(key.sign(manifest_bytes)) + b"\n"


def _signature(sig_file: bytes) -> bytes | None:
    try:
        raw = base64.b64decode(sig_file.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def check_pins(
    manifest_bytes: bytes,
    root: str,
    signature_file: bytes | None,
    *,
    expected_root: str | None,
    public_key: str | None,
    where: str,
) -> None:
    """Refuse (``ManifestRefused``) a manifest whose root is not ``expected_root`` or that is not
    signed by ``public_key`` (``signature_file`` is the ``.sig`` file's bytes, None when absent).
    ``where`` names the manifest in the message. A pin left unset is not checked."""
    if expected_root is not None and root != expected_root:
        raise ManifestRefused(
            f"{where} names model version {root}, but [model] expected_root pins {expected_root}: "
            "this is not the approved model (if it is the new one, pin its root after checking it)"
        )
    if public_key is None:
        return
    if signature_file is None:
        raise ManifestRefused(
            f"{where} is not signed ({where}{SIGNATURE_SUFFIX} is missing) and [model] manifest_public_key "
            "requires a signature: sign it with `butterfly-admin manifest sign`"
        )
    from cryptography.exceptions import InvalidSignature

    sig = _signature(signature_file)
    if sig is None:
        raise ManifestRefused(f"{where}{SIGNATURE_SUFFIX} is not an Ed25519 signature (base64 of 64 bytes)")
    try:
        parse_public_key(public_key).verify(sig, manifest_bytes)
    except InvalidSignature:
        raise ManifestRefused(
            f"{where}{SIGNATURE_SUFFIX} is not a signature of this manifest by the key in [model] "
            "manifest_public_key (signed by another key, or the manifest changed after signing)"
        ) from None


def is_root(text: str) -> bool:
    """True for a model version's name as manifests write it: 64 lowercase hex digits."""
    return bool(_ROOT.fullmatch(text))
