"""AEGIS-128L, the stage links' cipher: libsodium's, through PyNaCl, sealing in place.

Why AEGIS-128L and not AES-GCM: a link carries activations, a prefill chunk of 8192 tokens x 8192
hidden in bf16 is 128 MiB per hop, and on this project's CPUs (AES-NI + VAES) AEGIS-128L seals 3-4x
faster than AES-256-GCM (about 12 against 3.5 GB/s at 48 KiB; bench/README.md, bench_serving). It is
an authenticated cipher of the same kind (CAESAR's high-performance winner, IRTF CFRG draft, in
libsodium since 1.0.19): a 128-bit key per direction and connection, a 128-bit nonce that is the
frame's sequence number, a 256-bit tag.

Why not ``nacl.bindings.crypto_aead_aegis128l_encrypt``: it takes and returns ``bytes``, so a frame
would be copied into it, zero-filled, sealed, and copied out again: at a decode step's 1.5 KB that
wrapper costs 5 us where the cipher takes 0.6. This module calls the same cffi functions that wrapper
calls (PyNaCl's ``nacl._sodium``), on our own buffers: the sender seals its frame where it built it,
the receiver opens a frame straight into the buffer the tensor is then viewed from. cffi releases the
GIL for the call, so an engine's compute thread goes on meanwhile.

The pinned PyNaCl range (pyproject.toml) is the one whose ``_sodium`` module exports these functions;
``tests/test_serving_links.py`` checks every call here against PyNaCl's public wrapper on the same key,
nonce and data, so a PyNaCl that changed them fails the tests, not a cluster.
"""

from __future__ import annotations

from typing import Final

import nacl
import nacl.bindings
from nacl._sodium import ffi, lib

__all__ = ["KEY_BYTES", "NONCE_BYTES", "TAG_BYTES", "Aegis128L"]

if not all(
    hasattr(lib, f) for f in ("crypto_aead_aegis128l_encrypt", "crypto_aead_aegis128l_decrypt")
):  # pragma: no cover - an install that ignored pyproject.toml's pin
    raise ImportError(
        f"stage links need libsodium's AEGIS-128L, which PyNaCl {nacl.__version__} does not provide: "
        "install PyNaCl >= 1.6, < 1.7 (pip install 'pynacl>=1.6,<1.7')"
    )

# Picks the AES-NI implementation: without it libsodium runs a portable one, 200x slower.
nacl.bindings.sodium_init()

KEY_BYTES: Final = int(nacl.bindings.crypto_aead_aegis128l_KEYBYTES)
NONCE_BYTES: Final = int(nacl.bindings.crypto_aead_aegis128l_NPUBBYTES)
TAG_BYTES: Final = int(nacl.bindings.crypto_aead_aegis128l_ABYTES)


class Aegis128L:
    """One direction's key. ``seal`` and ``open`` are the whole interface; neither keeps state."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AEGIS-128L key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)

    def seal(self, buf: bytearray, nonce: bytes, aad: bytes) -> None:
        """``buf`` holds the plaintext followed by ``TAG_BYTES`` of room: seal it in place, the
        ciphertext over the plaintext and the tag in the room."""
        n = len(buf) - TAG_BYTES
        if n < 0 or len(nonce) != NONCE_BYTES:
            raise ValueError("seal needs room for the tag and a nonce of NONCE_BYTES")
        p = ffi.from_buffer(buf)
        if lib.crypto_aead_aegis128l_encrypt(p, ffi.NULL, p, n, aad, len(aad), ffi.NULL, nonce, self._key):
            raise RuntimeError("libsodium refused to seal a frame")  # only for an impossible length

    def open(self, sealed: bytes | bytearray | memoryview, nonce: bytes, aad: bytes) -> bytearray | None:
        """The plaintext of ``sealed`` (ciphertext then tag) in a new buffer, or None when the tag
        does not verify (altered, replayed, reordered, or sealed with another key)."""
        n = len(sealed) - TAG_BYTES
        if n < 0 or len(nonce) != NONCE_BYTES:
            return None
        out = bytearray(n)
        if lib.crypto_aead_aegis128l_decrypt(
            ffi.from_buffer(out),
            ffi.NULL,
            ffi.NULL,
            ffi.from_buffer(sealed),
            len(sealed),
            aad,
            len(aad),
            nonce,
            self._key,
        ):
            return None
        return out
