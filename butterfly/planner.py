"""Partition planner: which node holds which contiguous range of transformer blocks.

This module owns the decision only. It turns node capacities and the model's sizes into a ``Plan``
(epoch, node -> ``LayerRange`` in pipeline order) and raises ``PlanError`` when no plan fits, saying
how many bytes were needed and how many were offered, so the cluster can wait visibly instead of
loading something wrong. It must not do I/O, read clocks or randomness, log, or know about Raft,
the wire or the manifest format: the coordinator feeds it numbers and commits what it returns.

The model
---------
Stage bytes = the stage's blocks, plus ``embed_bytes`` on the first stage, plus ``head_bytes`` on the
last stage, plus ``embed_bytes`` again on the last stage when embeddings are tied (a single stage holds
the embeddings once). A stage fits when its bytes <= ``memory_bytes - reserve_bytes`` of its node. A
stage's cost is ``stage_bytes / throughput`` (a Python float division, the same everywhere, so costs
compare exactly); the plan's bottleneck is its largest stage cost. Every stage holds at least one block.

The objective, in priority order
--------------------------------
1. The smallest bottleneck (exact for a fixed node order, see below).
2. Only when something can be kept (a ``previous`` plan or ``cached_blocks``): the most *kept units*.
   A block is kept when it goes to a node that held it in the previous plan or has it cached; the
   embeddings (head) count one more unit when the previous first (last) node stays first (last). If
   allowing a bottleneck up to ``(1 + stickiness_tolerance)`` times the optimum keeps strictly more
   units than the optimum does, that plan wins; otherwise the optimum stands.
3. The most nodes used. A node is left out only when using it cannot keep the bottleneck (or, on a
   re-plan, the kept units); a spare node costs a pipeline hop but gives every stage more headroom.
4. Balance (a heuristic tie-break): stage boundaries as close as possible (in bytes) to the split
   proportional to what each node could hold at the chosen bottleneck, so slack is spread out instead
   of piling the first nodes up to their limits.
Ties after that go to the earlier candidate order and, within an order, to the earliest boundary.

Node order
----------
Stages follow a node order; for a fixed order the plan is exact (bisection on the bottleneck with a
greedy feasibility check that is optimal for a fixed order, then a dynamic program over (node,
boundary) for objectives 2-4 at that bottleneck). The order itself is a heuristic: a few candidate
orders are planned and the best plan wins (``candidate_orders``):

* canonical: throughput descending, then usable memory descending, then node_id ascending;
* memory first: usable memory descending, then throughput descending, then node_id;
* when some nodes have cached blocks: those nodes ordered by the median index of their cached
  blocks, followed by the other nodes in canonical order (a cold start on warm caches);
* on a re-plan, the previous pipeline order of the surviving nodes, followed by the other nodes in
  canonical order (so a re-plan can keep blocks even after throughputs are re-measured).

With uniform blocks and no embeddings/head, every order gives the same bottleneck; otherwise order
matters only through whole blocks not dividing evenly and through who carries embeddings and head.
Inputs are sorted before planning, so the plan does not depend on the order nodes were given in.

Cost: the bisection is exact on floats (it steps between achievable stage costs, at most 64 rounds,
each a greedy pass of O(n log L)); the DP only visits boundaries between the forward and backward
greedy reaches, with a numpy sparse table for the window maxima. 1,000 nodes x 1,000 blocks plans in
tens to a few hundred milliseconds (bench/bench_planner.py). Plans are computed once, by the
coordinator, and committed to the log: followers never need to reproduce the floats.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from butterfly.weights.layout import LayerRange

_MAX_EXACT = 1 << 53  # byte counts are compared as floats after division; keep them exact

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class PlanError(Exception):
    """No plan fits the nodes; the message says what was needed and what was available."""


@dataclass(frozen=True)
class Assignment:
    node_id: str
    layers: LayerRange


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order; their ranges tile [0, num_blocks) with no gap or overlap."""

    epoch: int
    assignments: tuple[Assignment, ...]

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise ValueError(f"plan epoch {self.epoch} is negative")
        if not self.assignments:
            raise ValueError("a plan needs at least one assignment")
        expected = 0
        for a in self.assignments:
            if a.layers.start != expected:
                raise ValueError(f"node {a.node_id} starts at block {a.layers.start}, expected {expected}")
            expected = a.layers.stop
        ids = [a.node_id for a in self.assignments]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a node appears twice in the plan: {ids}")

    @property
    def num_blocks(self) -> int:
        return self.assignments[-1].layers.stop

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(a.node_id for a in self.assignments)

    def range_of(self, node_id: str) -> LayerRange | None:
        for a in self.assignments:
            if a.node_id == node_id:
                return a.layers
        return None

    def __str__(self) -> str:
        return f"epoch {self.epoch}: " + " ".join(f"{a.node_id}={a.layers}" for a in self.assignments)


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers. ``memory_bytes`` is the memory for weights (GPU if any, else RAM) before
    the planner's ``reserve_bytes`` is taken off; ``throughput`` is a relative speed (> 0)."""

    node_id: str
    memory_bytes: int
    throughput: float
    cached_blocks: AbstractSet[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id is empty")
        if not 0 <= self.memory_bytes < _MAX_EXACT:
            raise ValueError(f"node {self.node_id}: memory_bytes {self.memory_bytes} out of range")
        if not (math.isfinite(self.throughput) and self.throughput > 0):
            raise ValueError(f"node {self.node_id}: throughput must be finite and > 0, got {self.throughput}")
        if any(b < 0 for b in self.cached_blocks):
            raise ValueError(f"node {self.node_id}: negative cached block index")
        # frozenset so the dataclass stays hashable whatever set type the caller passed
        object.__setattr__(self, "cached_blocks", frozenset(self.cached_blocks))


@dataclass(frozen=True)
class ModelSizes:
    """Bytes per transformer block (in order), of the embeddings and of the head (final norm, lm_head).
    With ``tied_embeddings`` the last stage needs the embedding matrix too (it is the head's weight)."""

    block_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_bytes", tuple(self.block_bytes))
        if not self.block_bytes:
            raise ValueError("the model has no transformer blocks")
        if min(self.block_bytes) < 0 or self.embed_bytes < 0 or self.head_bytes < 0:
            raise ValueError("byte sizes must be >= 0")
        if 2 * self.embed_bytes + sum(self.block_bytes) + self.head_bytes >= _MAX_EXACT:
            raise ValueError("model too large for exact byte arithmetic (2**53 bytes)")

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)


def stage_bytes(model: ModelSizes, layers: LayerRange, *, first: bool, last: bool) -> int:
    """Bytes a stage holding ``layers`` needs, with embeddings if ``first`` and head if ``last``."""
    total = sum(model.block_bytes[layers.start : layers.stop])
    if first:
        total += model.embed_bytes
    if last:
        total += model.head_bytes
        if model.tied_embeddings and not first:
            total += model.embed_bytes
    return total


def _stage_sizes(plan: Plan, model: ModelSizes) -> list[int]:
    last = len(plan.assignments) - 1
    return [
        stage_bytes(model, a.layers, first=i == 0, last=i == last) for i, a in enumerate(plan.assignments)
    ]


def plan_bottleneck(plan: Plan, nodes: Iterable[NodeCapacity], model: ModelSizes) -> float:
    """The plan's largest stage cost, stage_bytes / throughput."""
    by_id = {n.node_id: n for n in nodes}
    sizes = _stage_sizes(plan, model)
    return max(s / by_id[a.node_id].throughput for s, a in zip(sizes, plan.assignments, strict=True))


def validate_plan(
    plan: Plan, nodes: Iterable[NodeCapacity], model: ModelSizes, *, reserve_bytes: int = 0
) -> None:
    """Raise ``PlanError`` unless ``plan`` covers the model's blocks and every stage fits its node."""
    by_id = {n.node_id: n for n in nodes}
    if plan.num_blocks != model.num_blocks:
        raise PlanError(f"plan covers {plan.num_blocks} blocks, the model has {model.num_blocks}")
    for size, a in zip(_stage_sizes(plan, model), plan.assignments, strict=True):
        node = by_id.get(a.node_id)
        if node is None:
            raise PlanError(f"plan assigns blocks {a.layers} to unknown node {a.node_id}")
        if size > node.memory_bytes - reserve_bytes:
            raise PlanError(
                f"node {a.node_id} needs {size} bytes for blocks {a.layers} but offers "
                f"{node.memory_bytes - reserve_bytes} bytes after a reserve of {reserve_bytes}"
            )


# ---------------------------------------------------------------------------------------- orders


def _canonical_key(n: NodeCapacity) -> tuple[float, int, str]:
    return (-n.throughput, -n.memory_bytes, n.node_id)


def candidate_orders(nodes: Iterable[NodeCapacity], previous: Plan | None = None) -> list[tuple[str, ...]]:
    """The node orders the planner tries, deduplicated, in tie-break priority (see module docstring)."""
    node_list = list(nodes)
    canonical = tuple(n.node_id for n in sorted(node_list, key=_canonical_key))
    memory_first = tuple(
        n.node_id for n in sorted(node_list, key=lambda n: (-n.memory_bytes, -n.throughput, n.node_id))
    )
    orders = [canonical, memory_first]
    cached = [n for n in node_list if n.cached_blocks]
    if cached:
        # Nodes with a warm cache in the order of where their cached blocks sit, the rest after them.
        def median(n: NodeCapacity) -> int:
            blocks = sorted(n.cached_blocks)
            return blocks[len(blocks) // 2]

        by_cache = [n.node_id for n in sorted(cached, key=lambda n: (median(n), _canonical_key(n)))]
        warm = set(by_cache)
        orders.append(tuple(by_cache) + tuple(i for i in canonical if i not in warm))
    if previous is not None:
        present = set(canonical)
        survivors = [i for i in previous.node_ids if i in present]
        kept = set(survivors)
        orders.append(tuple(survivors) + tuple(i for i in canonical if i not in kept))
    unique: list[tuple[str, ...]] = []
    for o in orders:
        if o not in unique:
            unique.append(o)
    return unique


# ------------------------------------------------------------------------------ one fixed order


def _float_bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _float_from_bits(i: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", i))[0])


def _bits_midpoint(lo: float, hi: float) -> float:
    """A float in [lo, hi) halfway between them in representation order (0 <= lo < hi finite)."""
    return _float_from_bits((_float_bits(lo) + _float_bits(hi)) // 2)


_Stage = tuple[int, int, int]  # (position in the order, first block, stop block)


@dataclass(frozen=True)
class _NodeKeep:
    """What a node would keep in place: blocks it held in the previous plan or has cached, and
    whether it held the embeddings (was first) or the head (was last) in the previous plan."""

    blocks: frozenset[int]
    prefix: FloatArray | None  # prefix[p] = how many kept blocks lie in [0, p); None if no blocks
    embed: int
    head: int


_NO_KEEP = _NodeKeep(frozenset(), None, 0, 0)


def _keep_info(
    nodes: Sequence[NodeCapacity], model: ModelSizes, previous: Plan | None
) -> tuple[dict[str, _NodeKeep], int]:
    """Per node id what it would keep, and an upper bound on the kept units of any plan."""
    L = model.num_blocks
    if previous is not None and previous.num_blocks != L:
        previous = None  # a different model: nothing it placed can be kept
    prev_ranges = {a.node_id: a.layers for a in previous.assignments} if previous else {}
    first_id = previous.assignments[0].node_id if previous else None
    last_id = previous.assignments[-1].node_id if previous else None
    info: dict[str, _NodeKeep] = {}
    anywhere: set[int] = set()
    ends = 0
    for nd in nodes:
        blocks = set(nd.cached_blocks)
        if max(blocks, default=-1) >= L:
            raise ValueError(f"node {nd.node_id}: cached block {max(blocks)} but the model has {L} blocks")
        prev = prev_ranges.get(nd.node_id)
        if prev is not None:
            blocks.update(range(prev.start, prev.stop))
        prefix = None
        if blocks:
            marks = np.zeros(L + 1, dtype=np.float64)
            marks[1 + np.fromiter(blocks, dtype=np.int64)] = 1.0
            prefix = np.cumsum(marks)
        embed, head = int(nd.node_id == first_id), int(nd.node_id == last_id)
        if blocks or embed or head:
            info[nd.node_id] = _NodeKeep(frozenset(blocks), prefix, embed, head)
        anywhere |= blocks
        ends += embed + head
    return info, len(anywhere) + ends


class _FixedOrder:
    """Planning over one node order. Positions in ``nodes`` are pipeline positions."""

    def __init__(
        self, nodes: Sequence[NodeCapacity], model: ModelSizes, reserve: int, keep: Mapping[str, _NodeKeep]
    ) -> None:
        self.nodes = tuple(nodes)
        self.n = len(self.nodes)
        self.L = model.num_blocks
        self.E, self.H, self.T = model.embed_bytes, model.head_bytes, model.tied_embeddings
        self.mem = [nd.memory_bytes - reserve for nd in self.nodes]
        self.mem_np: IntArray = np.array(self.mem, dtype=np.int64)
        self.tp = [float(nd.throughput) for nd in self.nodes]
        self.tp_np: FloatArray = np.array(self.tp, dtype=np.float64)
        pre = [0]
        for b in model.block_bytes:
            pre.append(pre[-1] + b)
        self.pre = pre
        self.pre_np: IntArray = np.array(pre, dtype=np.int64)
        self.min_block = min(model.block_bytes)
        # floor(log2(x)) for window lengths, exact via frexp
        self.lg: IntArray = (np.frexp(np.arange(self.L + 2, dtype=np.float64))[1] - 1).astype(np.int64)
        self.keep = [keep.get(nd.node_id, _NO_KEEP) for nd in self.nodes]
        # Kept blocks weigh n + 1 in the DP score, so they outrank any number of nodes used.
        self.keep_wk = [None if k.prefix is None else k.prefix * float(self.n + 1) for k in self.keep]
        self.arange: IntArray = np.arange(self.L + 2, dtype=np.int64)
        self.pow2: IntArray = np.left_shift(1, np.arange(64, dtype=np.int64))

    def _g(self, i: int, f: FloatArray) -> FloatArray:
        """DP score at each start q with node i's kept blocks before q taken off (they are added back
        at the stage's end p, so the stage [q, p) is credited with exactly the ones inside it)."""
        wk = self.keep_wk[i]
        return f if wk is None else f - wk

    # -- capacities --------------------------------------------------------------------------

    def caps(self, bound: float) -> IntArray:
        """Per node, the most bytes a stage may hold: <= usable memory and bytes / throughput <= bound."""
        if math.isinf(bound):
            return self.mem_np.copy()
        tp = self.tp_np
        # Start from floor(bound * tp) and correct the last unit, so that "X / tp <= bound" holds
        # exactly as the float comparison the costs use (bound * tp itself may be rounded).
        x: IntArray = np.minimum(np.floor(bound * tp), self.mem_np + 1.0).astype(np.int64)
        for _ in range(64):
            over = x / tp > bound
            if not over.any():
                break
            x = x - over
        for _ in range(64):
            under = ((x + 1) / tp <= bound) & (x <= self.mem_np)
            if not under.any():
                break
            x = x + under
        return np.minimum(x, self.mem_np)

    # -- bottleneck --------------------------------------------------------------------------

    def greedy(self, bound: float) -> tuple[float | None, float]:
        """Feasibility of ``bound``: (the greedy plan's bottleneck or None, next_bound).

        Each node in order takes as many blocks as fit; this is optimal for a fixed order because a
        plan that has covered more blocks after k nodes can always do at least as well afterwards.
        When infeasible, ``next_bound`` is the smallest cost among the comparisons that failed: every
        bound below it replays exactly the same failing run, so the optimum is at least that.
        """
        caps = self.caps(bound).tolist()
        pre, L, E, H = self.pre, self.L, self.E, self.H
        total = pre[L]
        p = 0
        worst = 0.0
        nxt = math.inf
        for i in range(self.n):
            c, tp, m = caps[i], self.tp[i], self.mem[i]
            extra = E if p == 0 else 0
            tail = total - pre[p] + H + (E if (p == 0 or self.T) else 0)
            if tail <= c:
                return max(worst, tail / tp), nxt
            if tail <= m:
                nxt = min(nxt, tail / tp)
            # Not the last stage: leave at least one block for it.
            j = max(p, min(bisect.bisect_right(pre, pre[p] + c - extra, p, L) - 1, L - 1))
            if j < L - 1:
                more = pre[j + 1] - pre[p] + extra
                if more <= m:
                    nxt = min(nxt, more / tp)
            if j > p:
                worst = max(worst, (pre[j] - pre[p] + extra) / tp)
                p = j
        return None, nxt

    def min_bottleneck(self) -> float:
        """The exact optimal bottleneck for this order (a float stage cost), or inf if nothing fits."""
        hi, _ = self.greedy(math.inf)
        if hi is None:
            return math.inf
        need = self.E + self.pre[self.L] + self.H
        # Every byte is served by someone: bound >= need / sum(throughput). Probing just below it
        # gives the search a tight lower end at once.
        probe = need / math.fsum(self.tp) * (1 - 1e-9)
        got, lo = self.greedy(probe)
        if got is not None:
            hi = min(hi, got)
            got0, lo = self.greedy(0.0)
            if got0 is not None:
                return got0
        while lo < hi:
            mid = _bits_midpoint(lo, hi)
            got, nxt = self.greedy(mid)
            if got is not None:
                hi = got
            else:
                lo = nxt
        return hi

    # -- selection at a bound ----------------------------------------------------------------

    def _window_max(self, g: FloatArray, a: IntArray, length: IntArray) -> FloatArray:
        """max(g[a[k] : a[k] + length[k]]) for every k, -inf where length[k] <= 0: a sparse table."""
        shortest, longest = int(length.min()), int(length.max())
        if longest <= 0:
            return np.full(a.shape, -np.inf)
        if shortest <= 0:
            valid = length > 0
            a = np.where(valid, a, 0)
            length = np.where(valid, length, 1)
        levels = int(self.lg[longest]) + 1
        # Uninitialised is fine: a query at level k only reads entries that level has filled.
        table = np.empty((levels, g.shape[0]))
        table[0] = g
        for k in range(1, levels):
            half = 1 << (k - 1)
            width = g.shape[0] - (1 << k) + 1
            np.maximum(table[k - 1, :width], table[k - 1, half : half + width], out=table[k, :width])
        kk = self.lg[length]
        res: FloatArray = np.maximum(table[kk, a], table[kk, a + length - self.pow2[kk]])
        if shortest <= 0:
            res[~valid] = -np.inf
        return res

    def _targets(self, caps: IntArray) -> FloatArray:
        """Balance targets: where each node's stage would end (in block-prefix bytes) if the blocks
        were shared in proportion to the room each node has for blocks at this bound. Room is the
        cap, less the embeddings on the first node and the head on the last node that can hold a
        block; nodes that cannot hold one get no share."""
        usable = np.where(caps >= self.min_block, caps, 0).astype(np.float64)
        idx = np.flatnonzero(usable)
        if idx.size == 0:
            return np.zeros(self.n)
        usable[idx[0]] -= self.E
        usable[idx[-1]] -= self.H + (self.E if self.T else 0)
        cum = np.cumsum(np.maximum(usable, 0.0))
        if cum[-1] <= 0:
            return np.zeros(self.n)
        return np.asarray(self.pre[self.L] * cum / cum[-1], dtype=np.float64)

    def _forward_reach(self, caps: list[int]) -> list[int]:
        """Per node, the furthest boundary short of the end that nodes 0..i can reach (greedy)."""
        pre, L = self.pre, self.L
        out, p = [], 0
        for c in caps:
            extra = self.E if p == 0 else 0
            j = min(bisect.bisect_right(pre, pre[p] + c - extra, p, L) - 1, L - 1)
            p = max(p, j)
            out.append(p)
        return out

    def _backward_reach(self, caps: list[int]) -> list[int]:
        """Per node i, the smallest boundary from which nodes i+1.. can still finish (greedy from the
        end; the embeddings are ignored, they only matter at boundary 0, which is never computed)."""
        pre, L = self.pre, self.L
        out = [L] * self.n
        p = L
        for i in range(self.n - 1, 0, -1):
            c = caps[i]
            need = pre[p] + (self.H + (self.E if self.T else 0) if p == L else 0) - c
            q = bisect.bisect_left(pre, need, 0, p)
            if q < p:
                p = q
            out[i - 1] = p
        return out

    def select(self, bound: float) -> tuple[float, list[_Stage]] | None:
        """Best plan with bottleneck <= bound under objectives 2-4 (module docstring); None if none.

        f[p] = best score with blocks [0, p) placed on the nodes seen so far. The score is
        kept_units * (n + 1) + nodes_used - balance_penalty with the penalty summing to < 0.5, so the
        three objectives compare lexicographically in one float (all integer parts are exact).
        Only boundaries that are both reachable and still completable (the band between the forward
        and backward greedy reaches) are computed; the others can never be on an optimal path.
        """
        caps = self.caps(bound)
        caps_l = caps.tolist()
        n, L, E = self.n, self.L, self.E
        W = float(n + 1)
        pre, pre_np = self.pre, self.pre_np
        pre_f = pre_np.astype(np.float64)
        scale = 1.0 / (2.0 * (n + 1) * max(pre[L], 1))
        targets = self._targets(caps).tolist()
        upper = self._forward_reach(caps_l)
        lower = self._backward_reach(caps_l)

        f: FloatArray = np.full(L + 1, -np.inf)
        f[0] = 0.0
        fs = [f]
        for i in range(n):
            c = caps_l[i]
            lo, hi = max(1, lower[i]), upper[i]  # interior boundaries p in [lo, hi]
            best_l = self._best_start(i, L, c, self._g(i, f))[1] if c >= self.min_block else -math.inf
            if c < self.min_block or (lo > hi and best_l == -math.inf):
                fs.append(f)  # node i cannot end a stage anywhere useful: always skipped
                continue
            keep = self.keep[i]
            wk = self.keep_wk[i]
            g = self._g(i, f)
            new = f.copy()
            if lo <= hi:
                a = np.searchsorted(pre_np, pre_np[lo : hi + 1] - c, side="left")
                np.maximum(a, 1, out=a)
                base = int(a[0])
                a -= base
                best = self._window_max(g[base:hi], a, self.arange[lo - base : hi + 1 - base] - a)
                # q = 0 (the first stage, with the embeddings) fits for a prefix of the p's
                first_end = bisect.bisect_right(pre, c - E) - 1
                if first_end >= lo:
                    head = best[: first_end - lo + 1]
                    np.maximum(head, W * keep.embed, out=head)
                penalty = np.abs(pre_f[lo : hi + 1] - targets[i])
                penalty *= scale
                best -= penalty
                best += 1.0
                if wk is not None:
                    best += wk[lo : hi + 1]
                np.maximum(new[lo : hi + 1], best, out=new[lo : hi + 1])
            if best_l > -math.inf:
                gain_l = 1.0 - abs(pre[L] - targets[i]) * scale + W * keep.head
                if wk is not None:
                    gain_l += float(wk[L])
                new[L] = max(new[L], best_l + gain_l)
            f = new
            fs.append(f)
        if f[L] == -math.inf:
            return None
        return float(f[L]), self._reconstruct(fs, caps_l)

    def _best_start(self, i: int, p: int, c: int, g: FloatArray) -> tuple[int, float]:
        """For node i ending its stage at p: the start q maximising g (q = 0 carries the embed bonus)."""
        pre, L = self.pre, self.L
        if p < L:
            lo = bisect.bisect_left(pre, pre[p] - c)
            first_fits = pre[p] + self.E <= c
        else:
            lo = bisect.bisect_left(pre, pre[L] + self.H + (self.E if self.T else 0) - c)
            first_fits = pre[L] + self.E + self.H <= c
        lo = max(lo, 1)
        best_q, best_v = -1, -math.inf
        if first_fits:
            best_q, best_v = 0, float(self.n + 1) * self.keep[i].embed
        if lo <= p - 1:
            j = lo + int(np.argmax(g[lo:p]))
            if g[j] > best_v:
                best_q, best_v = j, float(g[j])
        return best_q, best_v

    def _reconstruct(self, fs: list[FloatArray], caps_l: list[int]) -> list[_Stage]:
        stages: list[_Stage] = []
        p = self.L
        for i in range(self.n - 1, -1, -1):
            if p == 0:
                break
            if fs[i + 1][p] == fs[i][p]:
                continue  # node i is not used (or using it scores no better)
            q, _ = self._best_start(i, p, caps_l[i], self._g(i, fs[i]))
            assert q >= 0, "DP value without a predecessor"
            stages.append((i, q, p))
            p = q
        assert p == 0, "DP reconstruction did not reach block 0"
        stages.reverse()
        return stages

    def kept_units(self, stages: Sequence[_Stage]) -> int:
        kept = 0
        for i, q, p in stages:
            keep = self.keep[i]
            kept += sum(1 for b in keep.blocks if q <= b < p)
            kept += keep.embed if q == 0 else 0
            kept += keep.head if p == self.L else 0
        return kept

    def to_plan(self, epoch: int, stages: Sequence[_Stage]) -> Plan:
        return Plan(
            epoch=epoch,
            assignments=tuple(Assignment(self.nodes[i].node_id, LayerRange(q, p)) for i, q, p in stages),
        )


# -------------------------------------------------------------------------------- entry points


def _check_inputs(nodes: Sequence[NodeCapacity], model: ModelSizes, reserve_bytes: int) -> None:
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes {reserve_bytes} is negative")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate node ids: {dupes}")
    if not nodes:
        raise PlanError("no nodes to plan for")


def _fmt(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


def _explain_infeasible(nodes: Sequence[NodeCapacity], model: ModelSizes, reserve: int) -> PlanError:
    usable = {n.node_id: n.memory_bytes - reserve for n in nodes}
    big_id = min(usable, key=lambda i: (-usable[i], i))
    big = usable[big_id]
    offer = f"the largest node ({big_id}) offers {_fmt(big)} after a reserve of {_fmt(reserve)}"
    blocks, E, H = model.block_bytes, model.embed_bytes, model.head_bytes
    L = len(blocks)
    worst = max(range(L), key=lambda b: (blocks[b], -b))
    if blocks[worst] > big:
        return PlanError(f"block {worst} alone needs {_fmt(blocks[worst])} but {offer}")
    first = E + blocks[0] + (H if L == 1 else 0)
    if first > big:
        return PlanError(f"the first stage needs embeddings + block 0 = {_fmt(first)} but {offer}")
    last = blocks[-1] + H + (E if (model.tied_embeddings or L == 1) else 0)
    if last > big:
        what = "head + tied embeddings" if model.tied_embeddings else "head"
        return PlanError(f"the last stage needs {what} + block {L - 1} = {_fmt(last)} but {offer}")
    need = E + sum(blocks) + H
    have = sum(max(0, u) for u in usable.values())
    if need > have:
        return PlanError(
            f"the model needs at least {_fmt(need)} (embeddings {E}, {L} blocks {sum(blocks)}, head {H}) "
            f"but the {len(nodes)} nodes offer {_fmt(have)} in total after a reserve of {_fmt(reserve)} each"
        )
    return PlanError(
        f"no split of the {L} blocks into whole contiguous ranges fits: the model needs {_fmt(need)}"
        f"{' plus the tied embeddings again' if model.tied_embeddings else ''}, the {len(nodes)} nodes "
        f"offer {_fmt(have)} in total but blocks cannot be split across nodes; {offer}"
    )


def _choose(
    orders: Sequence[_FixedOrder], epoch: int, tolerance: float, keep_bound: int, explain: PlanError
) -> Plan:
    """Objective 1 over all orders, then 2-4 among the orders that reach it (module docstring)."""
    bests = [o.min_bottleneck() for o in orders]
    optimum = min(bests)
    if math.isinf(optimum):
        raise explain

    def best_at(bound: float) -> tuple[int, list[_Stage]]:
        found: tuple[float, int, list[_Stage]] | None = None
        for idx, (o, b) in enumerate(zip(orders, bests, strict=True)):
            if b > bound:
                continue
            got = o.select(bound)
            assert got is not None, "a bound at or above the order's optimum must be feasible"
            if found is None or got[0] > found[0]:  # earlier order wins ties
                found = (got[0], idx, got[1])
        assert found is not None
        return found[1], found[2]

    idx, stages = best_at(optimum)
    kept = orders[idx].kept_units(stages)
    # A looser bound can only help stickiness, and only if something is left to keep.
    if tolerance > 0 and kept < keep_bound:
        idx_t, stages_t = best_at(optimum * (1.0 + tolerance))
        if orders[idx_t].kept_units(stages_t) > kept:
            idx, stages = idx_t, stages_t
    return orders[idx].to_plan(epoch, stages)


def _plan(
    orders: Sequence[Sequence[NodeCapacity]],
    model: ModelSizes,
    epoch: int,
    reserve_bytes: int,
    previous: Plan | None,
    stickiness_tolerance: float,
) -> Plan:
    nodes = list(orders[0])
    _check_inputs(nodes, model, reserve_bytes)
    if stickiness_tolerance < 0 or not math.isfinite(stickiness_tolerance):
        raise ValueError(f"stickiness_tolerance {stickiness_tolerance} must be finite and >= 0")
    keep, keep_bound = _keep_info(nodes, model, previous)
    fixed = [_FixedOrder(order, model, reserve_bytes, keep) for order in orders]
    explain = _explain_infeasible(nodes, model, reserve_bytes)
    return _choose(fixed, epoch, stickiness_tolerance, keep_bound, explain)


def plan_for_order(
    order: Sequence[NodeCapacity],
    model: ModelSizes,
    *,
    epoch: int,
    reserve_bytes: int = 0,
    previous: Plan | None = None,
    stickiness_tolerance: float = 0.01,
) -> Plan:
    """The best plan whose stages follow ``order`` exactly (nodes may be skipped, never reordered)."""
    return _plan([list(order)], model, epoch, reserve_bytes, previous, stickiness_tolerance)


def plan_partition(
    nodes: Iterable[NodeCapacity],
    model: ModelSizes,
    *,
    epoch: int,
    reserve_bytes: int = 0,
    previous: Plan | None = None,
    stickiness_tolerance: float = 0.01,
) -> Plan:
    """Plan contiguous block ranges over ``nodes`` (objectives and orders in the module docstring).

    ``previous`` is the plan being replaced on a re-plan; ``stickiness_tolerance`` is how much worse
    than optimal (relative) the bottleneck may get to keep more blocks in place. Raises ``PlanError``
    when nothing fits and ``ValueError`` on malformed input (duplicate ids, negative reserve).
    """
    node_list = sorted(nodes, key=_canonical_key)
    by_id = {n.node_id: n for n in node_list}
    orders = [[by_id[i] for i in order] for order in candidate_orders(node_list, previous)] or [[]]
    return _plan(orders, model, epoch, reserve_bytes, previous, stickiness_tolerance)
