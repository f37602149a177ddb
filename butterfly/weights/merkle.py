"""RFC 6962-style Merkle trees over BLAKE3: roots, inclusion proofs and compact range proofs.

This module owns the tree arithmetic that names a model version (the root over the ordered layer
digests) and lets a node prove that the layers it holds belong to that version:

* leaf hash  = BLAKE3(0x00 || data), inner node = BLAKE3(0x01 || left || right). The distinct prefixes
  are what stop a 64-byte leaf from being passed off as an inner node (second preimage), see RFC 6962
  section 2.1.
* A tree of n > 1 leaves splits at k, the largest power of two smaller than n; the left subtree is
  always perfect. A leaf is never duplicated to fill a level (the Bitcoin construction does that, and
  it lets two different leaf lists share a root).
* The empty tree's root is BLAKE3(b"").

Functions that build (``merkle_root``, ``inclusion_proof``, ``range_proof``) take already-hashed leaves
(``leaf_hash(digest)`` for each layer digest) and raise ``ValueError`` on caller mistakes. Functions that
verify (``verify_inclusion``, ``verify_range``) take what a peer sent and never raise on it: anything
malformed (wrong lengths, index or size out of range, a proof too short or too long) is ``False``.

Two rules for callers, because the tree alone cannot enforce them:

* ``tree_size`` must come from the trusted side (the manifest's layer count), never from the prover.
  An RFC 6962 root does not commit to the number of leaves by itself (Certificate Transparency signs
  size and root together for this reason): a proof for leaf 0 of a 5-leaf tree also checks as leaf 0
  of a 7-leaf tree with the same root, because the verifier only sees one opaque hash for the right
  side. Any size that changes the shape of the proof is rejected.
* Hash the data yourself: pass ``leaf_hash(layer_digest)``, not a leaf hash a peer supplied, so the
  0x00 prefix is applied by the verifier.

Range proofs are compact and subtree-based (not a list of inclusion proofs): the proof holds, left to
right, the root of every maximal subtree that lies entirely outside [start, stop) on the paths to the
range's two ends; the verifier rebuilds the covered subtrees from the leaves it holds. That is at most
two hashes per level, about 2*log2(n) in all, and the shape is fixed by (tree_size, start, stop), so
the verifier knows exactly how many hashes to consume.

This module must not do I/O, know about layers, manifests or files, or hash anything but bytes it is
given; the manifest and the validator own those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import blake3

HASH_SIZE = 32
"""Length in bytes of every leaf hash, node hash and root (BLAKE3's default output)."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def _hash(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf: BLAKE3(0x00 || data)."""
    return _hash(_LEAF_PREFIX + bytes(data))


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an inner node: BLAKE3(0x01 || left || right)."""
    return _hash(_NODE_PREFIX + left + right)


def empty_root() -> bytes:
    """Root of the tree with no leaves: BLAKE3 of the empty string (RFC 6962 MTH({}))."""
    return _hash(b"")


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2): the size of the left subtree."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaves(leaf_hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(leaf_hashes):
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} is {len(h)} bytes, expected {HASH_SIZE}")


def _subtree_root(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    if hi - lo == 1:
        return bytes(leaf_hashes[lo])
    k = _split(hi - lo)
    return node_hash(_subtree_root(leaf_hashes, lo, lo + k), _subtree_root(leaf_hashes, lo + k, hi))


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Root of the tree over ``leaf_hashes`` (each already ``leaf_hash``-ed), in order."""
    _check_leaves(leaf_hashes)
    if not leaf_hashes:
        return empty_root()
    return _subtree_root(leaf_hashes, 0, len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962 audit path for leaf ``index``: sibling subtree roots ordered from the leaf up."""
    _check_leaves(leaf_hashes)
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of {n} leaves")
    path: list[bytes] = []
    lo, hi = 0, n
    # Walk down from the root collecting the sibling of each subtree we enter; reversed at the end
    # because the RFC orders the path from the leaf upwards.
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(_subtree_root(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_subtree_root(leaf_hashes, lo, lo + k))
            lo = lo + k
    path.reverse()
    return path


def _is_hash(value: object) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview)) and len(value) == HASH_SIZE


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True iff ``proof`` shows ``leaf_hash`` at ``index`` in the ``tree_size``-leaf tree with ``root``.

    The algorithm of RFC 9162 section 2.1.3.2; ``tree_size`` must come from a trusted source (see the
    module docstring).
    """
    if not (_is_hash(leaf_hash) and _is_hash(root)) or not 0 <= index < tree_size:
        return False
    if not all(_is_hash(p) for p in proof):
        return False
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            return False  # proof longer than the path for this size
        if fn & 1 or fn == sn:
            r = node_hash(bytes(p), r)
            # A right-edge node with no right sibling at these levels: climb past them.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, bytes(p))
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == bytes(root)


def _range_proof(
    leaf_hashes: Sequence[bytes], lo: int, hi: int, start: int, stop: int, out: list[bytes]
) -> None:
    if hi <= start or lo >= stop:
        out.append(_subtree_root(leaf_hashes, lo, hi))
    elif start <= lo and hi <= stop:
        return  # covered: the verifier rebuilds it from the leaves it holds
    else:
        k = _split(hi - lo)
        _range_proof(leaf_hashes, lo, lo + k, start, stop, out)
        _range_proof(leaf_hashes, lo + k, hi, start, stop, out)


def range_proof(leaf_hashes: Sequence[bytes], start: int, stop: int) -> list[bytes]:
    """Compact proof that leaves [start, stop) belong to the tree: outside subtree roots, left to right."""
    _check_leaves(leaf_hashes)
    n = len(leaf_hashes)
    if not 0 <= start < stop <= n:
        raise ValueError(f"range [{start}, {stop}) is empty or outside a tree of {n} leaves")
    out: list[bytes] = []
    _range_proof(leaf_hashes, 0, n, start, stop, out)
    return out


def _range_root(
    lo: int, hi: int, start: int, stop: int, leaves: Sequence[bytes], proof: Iterator[bytes]
) -> bytes:
    if hi <= start or lo >= stop:
        return next(proof)  # StopIteration here means the proof is too short; the caller maps it
    if start <= lo and hi <= stop:
        return _subtree_root(leaves, lo - start, hi - start)
    k = _split(hi - lo)
    left = _range_root(lo, lo + k, start, stop, leaves, proof)
    right = _range_root(lo + k, hi, start, stop, leaves, proof)
    return node_hash(left, right)


def verify_range(
    leaves_in_range: Sequence[bytes], start: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True iff ``leaves_in_range`` are exactly leaves [start, start + len) of the tree with ``root``.

    ``proof`` is what ``range_proof`` returned; ``tree_size`` must come from a trusted source.
    """
    stop = start + len(leaves_in_range)
    if not _is_hash(root) or not 0 <= start < stop <= tree_size:
        return False
    if not all(_is_hash(h) for h in leaves_in_range) or not all(_is_hash(p) for p in proof):
        return False
    leaves = [bytes(h) for h in leaves_in_range]
    elements = iter([bytes(p) for p in proof])
    try:
        computed = _range_root(0, tree_size, start, stop, leaves, elements)
    except StopIteration:
        return False
    if next(elements, None) is not None:
        return False  # extra elements: a proof for another shape, never accept it
    return computed == bytes(root)
