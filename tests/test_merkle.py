"""Merkle tree: hand-computed small trees, proofs, second-preimage resistance and bit-flip properties."""

from __future__ import annotations

from typing import TypeAlias

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.weights.merkle import (
    HASH_SIZE,
    empty_root,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    range_proof,
    verify_inclusion,
    verify_range,
)


def H(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def L(data: bytes) -> bytes:
    return H(b"\x00" + data)


def N(left: bytes, right: bytes) -> bytes:
    return H(b"\x01" + left + right)


DATA = [f"layer-{i}".encode() for i in range(8)]
LEAVES = [L(d) for d in DATA]


# ---------------------------------------------------------------- hand-computed trees


def test_empty_root_is_blake3_of_nothing() -> None:
    # BLAKE3's published test vector for the empty input.
    expected = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
    assert empty_root() == expected
    assert merkle_root([]) == expected


def test_leaf_and_node_hashes_use_distinct_prefixes() -> None:
    assert leaf_hash(b"abc") == H(b"\x00abc")
    assert node_hash(LEAVES[0], LEAVES[1]) == H(b"\x01" + LEAVES[0] + LEAVES[1])
    assert leaf_hash(LEAVES[0] + LEAVES[1]) != node_hash(LEAVES[0], LEAVES[1])


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, LEAVES[0]),
        (2, N(LEAVES[0], LEAVES[1])),
        (3, N(N(LEAVES[0], LEAVES[1]), LEAVES[2])),
        (4, N(N(LEAVES[0], LEAVES[1]), N(LEAVES[2], LEAVES[3]))),
        (5, N(N(N(LEAVES[0], LEAVES[1]), N(LEAVES[2], LEAVES[3])), LEAVES[4])),
        (
            7,
            N(
                N(N(LEAVES[0], LEAVES[1]), N(LEAVES[2], LEAVES[3])),
                N(N(LEAVES[4], LEAVES[5]), LEAVES[6]),
            ),
        ),
    ],
)
def test_small_roots_by_hand(n: int, expected: bytes) -> None:
    assert merkle_root(LEAVES[:n]) == expected


def test_odd_count_never_duplicates_a_leaf() -> None:
    # Bitcoin-style duplication would make [a, b, c] and [a, b, c, c] share a root.
    assert merkle_root(LEAVES[:3]) != merkle_root(LEAVES[:3] + [LEAVES[2]])


def test_inclusion_path_by_hand() -> None:
    n01, n23 = N(LEAVES[0], LEAVES[1]), N(LEAVES[2], LEAVES[3])
    # RFC 6962 PATH(5, D[7]) = PATH(1, D[4:7]) : MTH(D[0:4]) = [l4, l6, MTH(D[0:4])]
    assert inclusion_proof(LEAVES[:7], 5) == [LEAVES[4], LEAVES[6], N(n01, n23)]
    assert inclusion_proof(LEAVES[:7], 6) == [N(LEAVES[4], LEAVES[5]), N(n01, n23)]
    assert inclusion_proof(LEAVES[:1], 0) == []


def test_range_proof_by_hand() -> None:
    # [2, 5) of 7: [0,2) lies outside, [2,4) is covered, [4,5) covered, [5,6) and [6,7) outside.
    assert range_proof(LEAVES[:7], 2, 5) == [N(LEAVES[0], LEAVES[1]), LEAVES[5], LEAVES[6]]
    assert range_proof(LEAVES[:7], 0, 7) == []
    assert range_proof(LEAVES[:8], 4, 8) == [merkle_root(LEAVES[:4])]


def test_verify_accepts_hand_examples() -> None:
    root7 = merkle_root(LEAVES[:7])
    for i in range(7):
        assert verify_inclusion(LEAVES[i], i, 7, inclusion_proof(LEAVES[:7], i), root7)
    assert verify_range(LEAVES[2:5], 2, 7, range_proof(LEAVES[:7], 2, 5), root7)


# ---------------------------------------------------------------- second preimage


def _naive_root(hashes: list[bytes]) -> bytes:
    """The same tree without domain separation, to show the attack below is real."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return H(_naive_root(hashes[:k]) + _naive_root(hashes[k:]))


def test_inner_node_cannot_pass_as_leaf() -> None:
    four = LEAVES[:4]
    root = merkle_root(four)
    n01, n23 = N(four[0], four[1]), N(four[2], four[3])

    # Without prefixes, the 64-byte preimage of an inner node is a valid leaf of a smaller tree.
    naive = [H(d) for d in DATA[:4]]
    forged_naive_leaf = H(naive[0] + naive[1])
    assert _naive_root([forged_naive_leaf, H(naive[2] + naive[3])]) == _naive_root(naive)

    # With them, the same forgery fails: the verifier applies 0x00 to the data, the tree used 0x01.
    forged_leaf = leaf_hash(four[0] + four[1])
    assert not verify_inclusion(forged_leaf, 0, 2, [n23], root)
    assert not verify_range([forged_leaf], 0, 2, [n23], root)
    # And at the trusted size, an inner node handed in as a leaf hash has the wrong path length.
    assert not verify_inclusion(n01, 0, 4, [n23], root)
    assert not verify_range([n01], 0, 4, [n23], root)


def test_size_is_not_committed_by_the_root_alone() -> None:
    # Documented limitation (why tree_size must come from the manifest): leaf 0 of 5 leaves has the
    # same proof shape as leaf 0 of 7 leaves, so the same proof checks at both sizes.
    five = LEAVES[:5]
    proof = inclusion_proof(five, 0)
    assert verify_inclusion(five[0], 0, 7, proof, merkle_root(five))
    assert not verify_inclusion(five[0], 0, 4, proof, merkle_root(five))


# ---------------------------------------------------------------- malformed input


def test_builders_reject_caller_mistakes() -> None:
    with pytest.raises(ValueError, match="expected 32"):
        merkle_root([b"short"])
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(LEAVES[:3], 3)
    with pytest.raises(ValueError, match="empty or outside"):
        range_proof(LEAVES[:3], 2, 2)
    with pytest.raises(ValueError, match="empty or outside"):
        range_proof(LEAVES[:3], 1, 4)


def test_verifiers_return_false_on_garbage() -> None:
    root = merkle_root(LEAVES[:4])
    proof = inclusion_proof(LEAVES[:4], 1)
    assert not verify_inclusion(LEAVES[1], -1, 4, proof, root)
    assert not verify_inclusion(LEAVES[1], 1, 0, proof, root)
    assert not verify_inclusion(LEAVES[1][:31], 1, 4, proof, root)
    assert not verify_inclusion(LEAVES[1], 1, 4, proof, root[:16])
    assert not verify_inclusion(LEAVES[1], 1, 4, [proof[0], b"x" * 33], root)
    assert not verify_range([], 0, 4, [], root)
    assert not verify_range(LEAVES[:4], 1, 4, [], root)
    assert not verify_range(LEAVES[:2], 0, 4, [*range_proof(LEAVES[:4], 0, 2), "str"], root)  # type: ignore[list-item]


# ---------------------------------------------------------------- properties

Shape: TypeAlias = str | tuple["Shape", "Shape"]


def _largest_pow2_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _shape(lo: int, hi: int, start: int, stop: int) -> Shape:
    """What a verifier computes for range [start, stop): 'P' = one proof hash, 'l' = one given leaf.

    Two (size, start, stop) claims with the same shape run the same computation, so a proof for one
    also checks for the other; with distinct leaves, different shapes never give the same root.
    """
    if hi <= start or lo >= stop:
        return "P"
    if hi - lo == 1:
        return "l"
    k = _largest_pow2_below(hi - lo)
    return (_shape(lo, lo + k, start, stop), _shape(lo + k, hi, start, stop))


def _same_shape(size: int, start: int, stop: int, size2: int, start2: int, stop2: int) -> bool:
    if not 0 <= start2 < stop2 <= size2:
        return False
    return _shape(0, size, start, stop) == _shape(0, size2, start2, stop2)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def trees(draw: st.DrawFn) -> list[bytes]:
    size = draw(st.integers(min_value=1, max_value=40))
    salt = draw(st.binary(max_size=8))
    # Distinct leaves: with repeated leaves, "wrong index" can be a true statement.
    return [leaf_hash(salt + i.to_bytes(4, "big")) for i in range(size)]


@settings(max_examples=150, deadline=None)
@given(tree=trees(), data=st.data())
def test_every_inclusion_proof_verifies_and_every_bit_flip_fails(
    tree: list[bytes], data: st.DataObject
) -> None:
    n = len(tree)
    root = merkle_root(tree)
    i = data.draw(st.integers(0, n - 1))
    proof = inclusion_proof(tree, i)
    assert verify_inclusion(tree[i], i, n, proof, root)
    assert len(proof) <= (n - 1).bit_length()  # one sibling per level, at most

    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
    assert not verify_inclusion(_flip(tree[i], bit), i, n, proof, root)
    assert not verify_inclusion(tree[i], i, n, proof, _flip(root, bit))
    if proof:
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[j] = _flip(bad[j], bit)
        assert not verify_inclusion(tree[i], i, n, bad, root)
        assert not verify_inclusion(tree[i], i, n, proof[:-1], root)
        if len(proof) > 1:
            assert not verify_inclusion(tree[i], i, n, proof[::-1], root)
    assert not verify_inclusion(tree[i], i, n, [*proof, proof[0] if proof else root], root)

    k = data.draw(st.integers(0, 7))
    i2 = i ^ (1 << k)
    assert not verify_inclusion(tree[i], i2, n, proof, root)  # same size: every other index fails
    n2 = n ^ (1 << k)
    expected = _same_shape(n, i, i + 1, n2, i, i + 1)
    assert verify_inclusion(tree[i], i, n2, proof, root) == expected
    other = (i + 1) % n
    if other != i:
        assert not verify_inclusion(tree[other], i, n, proof, root)


@settings(max_examples=150, deadline=None)
@given(tree=trees(), data=st.data())
def test_every_range_proof_verifies_and_every_change_fails(tree: list[bytes], data: st.DataObject) -> None:
    n = len(tree)
    root = merkle_root(tree)
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    leaves = tree[start:stop]
    proof = range_proof(tree, start, stop)
    assert verify_range(leaves, start, n, proof, root)
    # Compact: at most two outside subtrees per level.
    assert len(proof) <= 2 * max(1, (n - 1).bit_length())

    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1))
    j = data.draw(st.integers(0, len(leaves) - 1))
    bad_leaves = list(leaves)
    bad_leaves[j] = _flip(bad_leaves[j], bit)
    assert not verify_range(bad_leaves, start, n, proof, root)
    if len(leaves) > 1:
        assert not verify_range([*leaves[1:], leaves[0]], start, n, proof, root)  # rotated
    if proof:
        m = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[m] = _flip(bad[m], bit)
        assert not verify_range(leaves, start, n, bad, root)
        assert not verify_range(leaves, start, n, proof[:-1], root)
    assert not verify_range(leaves, start, n, [*proof, root], root)

    k = data.draw(st.integers(0, 7))
    start2 = start ^ (1 << k)
    assert not verify_range(leaves, start2, n, proof, root)  # same size: every other start fails
    n2 = n ^ (1 << k)
    assert verify_range(leaves, start, n2, proof, root) == _same_shape(n, start, stop, n2, start, stop)
    # A node that drops a leaf from the end of its range makes a different claim.
    if len(leaves) > 1:
        assert not verify_range(leaves[:-1], start, n, proof, root)


@settings(max_examples=60, deadline=None)
@given(tree=trees(), data=st.data())
def test_single_leaf_range_and_inclusion_proof_carry_the_same_hashes(
    tree: list[bytes], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(tree) - 1))
    inc = inclusion_proof(tree, i)
    rng = range_proof(tree, i, i + 1)
    assert sorted(inc) == sorted(rng)  # the same subtrees; inclusion is leaf-up, range left-to-right
    assert verify_range([tree[i]], i, len(tree), rng, merkle_root(tree))
