"""A chaos run's history and the checker that judges it, Jepsen-style: the run only records what
nodes answered and what faults were injected when; this module decides afterwards whether any
answer broke a safety rule or the cluster failed to recover.

The history is every ``/status`` and ``/ready`` answer and every request served of every node (see
``poller``), on the one monotonic clock of the machine, plus the faults with their start and heal
times. A served request counts as serving in the epoch of the node's /ready answer around it. The
rules (each applies to /ready 200 and to served requests alike):

* **one leader per term**: no two nodes are ever named coordinator for the same term;
* **serve only committed epochs**: every ``/ready`` 200 is OPERATIONAL in an epoch >= 1 that was
  committed (reported by the coordinator itself, or by a majority of the nodes);
* **no stale serving**: no ``/ready`` 200 for epoch E more than ``serve_bound_s`` after a later epoch
  was first reported anywhere;
* **faults stop serving**: while a node is killed, frozen, cut off or has its cluster child frozen,
  from ``serve_bound_s`` after the fault until it heals, that node never answers 200, and no node
  answers 200 for an epoch at or below the one in force when the fault began (its layers are gone);
* **nothing committed is lost**: a node's term and epoch never go backwards, across restarts too,
  and at the end every node reports at least the highest epoch ever committed;
* **workers never lead**: no node configured ``role = "worker"`` is ever named coordinator (it votes
  when founding needs it to make up quorum_size, but never stands);
* **recovery**: after the last heal, within ``recover_bound_s``, every node still up (a ``crash`` is
  never restarted) answers ``/ready`` 200 in one epoch, or says it is a spare of that epoch (the
  coordinator keeps a returning node out of the plan when it would not speed the pipeline up);
* **leaderless, and saying so**: when every coordinator-eligible node has crashed for good (the spec's
  one-coordinator cluster losing it), recovery is impossible and not expected: instead, from
  ``serve_bound_s`` after the crash, no node serves at all, and every ``/ready`` 503 of the nodes left
  says why (a non-empty ``waiting_reason``).

``check`` returns the violations as sentences (empty: the run passed); ``load`` reads a run's files.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Faults after which the target must stop serving, and every node must stop serving the epoch in force.
NODE_FAULTS = frozenset({"kill", "crash", "stop_node", "stop_cluster_child", "isolate"})
# Faults after which only the target must stop (a hung child stops the node's gate, not the cluster).
CHILD_FAULTS = frozenset({"stop_loader_child", "stop_validator_child", "stop_engine_child"})


@dataclass(frozen=True)
class Answer:
    t: float
    node: str
    kind: str  # "status" | "ready"
    code: int | None
    body: dict[str, Any] | None


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    t0: float
    t1: float
    """When it was healed (killed node restarted, SIGCONT sent, link up, rules deleted); for a
    ``crash`` (never restarted), the end of the history."""
    peer: str | None = None
    """For a one-way drop: the node whose packets ``target`` stops receiving."""
    pid: int | None = None
    """For a child fault: the frozen child's pid. The fault ends early if the supervisor replaces it."""


@dataclass
class History:
    nodes: list[str]
    answers: list[Answer] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    healed_at: float = 0.0
    """When the last fault was healed: recovery is measured from here."""
    ended_at: float = 0.0
    roles: dict[str, str] = field(default_factory=dict)
    """Each node's configured role (absent: coordinator, as in the mesh topology)."""
    topology: str = "mesh"

    def role(self, node: str) -> str:
        return self.roles.get(node, "coordinator")

    def crashed(self) -> set[str]:
        """The nodes killed for good during the run."""
        return {f.target for f in self.faults if f.kind == "crash"}

    def leaderless(self) -> bool:
        """Every coordinator-eligible node crashed for good: nobody may lead again."""
        down = self.crashed()
        return bool(down) and all(self.role(n) != "coordinator" or n in down for n in self.nodes)

    def save(self, path: Path) -> None:
        doc = {
            "nodes": self.nodes,
            "roles": self.roles,
            "topology": self.topology,
            "faults": [asdict(f) for f in self.faults],
            "healed_at": self.healed_at,
            "ended_at": self.ended_at,
        }
        path.write_text(json.dumps(doc, indent=1))


def load(meta: Path, answer_files: list[Path]) -> History:
    doc = json.loads(meta.read_text())
    history = History(
        nodes=list(doc["nodes"]),
        faults=[Fault(**f) for f in doc["faults"]],
        healed_at=float(doc["healed_at"]),
        ended_at=float(doc["ended_at"]),
        roles=dict(doc.get("roles") or {}),
        topology=str(doc.get("topology") or "mesh"),
    )
    for path in answer_files:
        for line in path.read_text().splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue  # the poller was killed mid-line
            history.answers.append(Answer(raw["t"], raw["node"], raw["kind"], raw["code"], raw["body"]))
    history.answers.sort(key=lambda a: a.t)
    return history


def _statuses(h: History) -> list[tuple[Answer, dict[str, Any]]]:
    return [(a, a.body) for a in h.answers if a.kind == "status" and a.code == 200 and a.body]


def _served(h: History) -> list[tuple[Answer, dict[str, Any]]]:
    """Every /ready 200 and every request served (200), the latter judged as in the epoch and state of
    the node's /ready answer just before it (a request served after a 503 is judged as not OPERATIONAL
    only if the /ready just after it was not 200 either: the gate may have opened in between)."""
    out: list[tuple[Answer, dict[str, Any]]] = []
    last: dict[str, Answer] = {}
    pending: dict[str, list[Answer]] = defaultdict(list)
    for a in h.answers:
        if a.kind == "ready":
            for served in pending.pop(a.node, []):
                before = last.get(a.node)
                around = [x for x in (before, a) if x is not None and x.code == 200]
                body = (around[0].body if around else (before or a).body) or {}
                out.append(
                    (served, body if around else {**body, "state": f"{body.get('state')} (/ready 503)"})
                )
            last[a.node] = a
            if a.code == 200:
                out.append((a, a.body or {}))
        elif a.kind == "serve" and a.code == 200:
            pending[a.node].append(a)
    for node, served_list in pending.items():
        for served in served_list:
            tail = last[node].body if node in last else None
            out.append((served, tail or {"state": "unknown (no /ready answer)"}))
    out.sort(key=lambda pair: pair[0].t)
    return out


def _what(a: Answer) -> str:
    return "served a request" if a.kind == "serve" else "answered /ready 200"


def _committed_epochs(h: History) -> dict[int, float]:
    """Committed epoch -> first time it was reported anywhere."""
    first: dict[int, float] = {}
    by_node: dict[int, set[str]] = defaultdict(set)
    from_leader: set[int] = set()
    for a, s in _statuses(h):
        epoch = int(s.get("epoch") or 0)
        if epoch <= 0:
            continue
        first.setdefault(epoch, a.t)
        by_node[epoch].add(a.node)
        if s.get("coordinator") is not None and s.get("coordinator") == s.get("node_id"):
            from_leader.add(epoch)
    majority = len(h.nodes) // 2 + 1
    return {e: t for e, t in first.items() if e in from_leader or len(by_node[e]) >= majority}


def one_leader_per_term(h: History) -> list[str]:
    leaders: dict[int, set[str]] = defaultdict(set)
    for _, s in _statuses(h):
        if s.get("coordinator"):
            leaders[int(s.get("term") or 0)].add(str(s["coordinator"]))
    return [
        f"term {term} had {len(names)} leaders: {', '.join(sorted(names))}"
        for term, names in sorted(leaders.items())
        if len(names) > 1
    ]


def workers_never_lead(h: History) -> list[str]:
    out = []
    for a, s in _statuses(h):
        named = s.get("coordinator")
        if named and h.role(str(named)) == "worker":
            out.append(f"{a.node} named worker {named} coordinator in term {s.get('term')} at {a.t:.3f}")
        if s.get("role") == "coordinator" and h.role(a.node) == "worker":
            out.append(f"worker {a.node} said it was coordinator in term {s.get('term')} at {a.t:.3f}")
    return out


def leaderless_says_why(h: History, serve_bound_s: float) -> list[str]:
    """With every coordinator-eligible node crashed for good: nobody serves, and every node left says
    why it does not."""
    if not h.leaderless():
        return []
    after = max(f.t0 for f in h.faults if f.kind == "crash") + serve_bound_s
    down = h.crashed()
    out = []
    for a, _ in _served(h):
        if a.t > after:
            out.append(f"{a.node} {_what(a)} at {a.t:.3f} with no coordinator-eligible node left")
    for a in h.answers:
        if a.kind == "ready" and a.code == 503 and a.t > after and a.node not in down:
            if not str((a.body or {}).get("waiting_reason") or "").strip():
                out.append(f"{a.node} answered /ready 503 at {a.t:.3f} without a waiting_reason")
    return out


def serve_only_committed(h: History) -> list[str]:
    committed = _committed_epochs(h)
    out = []
    for a, body in _served(h):
        epoch = int(body.get("epoch") or 0)
        if body.get("state") != "OPERATIONAL":
            out.append(f"{a.node} {_what(a)} at {a.t:.3f} in state {body.get('state')}")
        elif epoch not in committed:
            out.append(f"{a.node} {_what(a)} at {a.t:.3f} for epoch {epoch}, never committed")
    return out


def no_stale_serving(h: History, serve_bound_s: float) -> list[str]:
    committed = sorted(_committed_epochs(h).items())
    out = []
    for a, body in _served(h):
        epoch = int(body.get("epoch") or 0)
        newer = [(e, t) for e, t in committed if e > epoch and t < a.t - serve_bound_s]
        if newer:
            e, t = newer[0]
            out.append(
                f"{a.node} {_what(a)} for epoch {epoch} at {a.t:.3f}, "
                f"{a.t - t:.2f} s after epoch {e} was reported"
            )
    return out


def faults_stop_serving(h: History, serve_bound_s: float, child_bound_s: float) -> list[str]:
    out = []
    epochs_before = [(a.t, int(s.get("epoch") or 0)) for a, s in _statuses(h)]
    for f in h.faults:
        if f.kind not in NODE_FAULTS and f.kind not in CHILD_FAULTS:
            continue
        start = f.t0 + (serve_bound_s if f.kind in NODE_FAULTS else child_bound_s)
        end = _replaced(h, f) if f.pid is not None else f.t1
        in_force = max((e for t, e in epochs_before if t < f.t0), default=0)
        for a, body in _served(h):
            if not start < a.t < end:
                continue
            epoch = int(body.get("epoch") or 0)
            if a.node == f.target:
                out.append(
                    f"{a.node} {_what(a)} at {a.t:.3f}, {a.t - f.t0:.2f} s into its own {f.kind} "
                    f"(bound {start - f.t0:g} s)"
                )
            elif f.kind in NODE_FAULTS and epoch <= in_force:
                out.append(
                    f"{a.node} {_what(a)} for epoch {epoch} at {a.t:.3f}, {a.t - f.t0:.2f} s after "
                    f"{f.kind} of {f.target}, whose layers epoch {in_force} needs"
                )
    return out


def _replaced(h: History, f: Fault) -> float:
    """When the frozen child stopped being the target's child of that name (the supervisor killed it,
    seen dead or replaced): from then on the node may serve again, though the old pid is only resumed
    at ``t1``."""
    name = f.kind.removeprefix("stop_").removesuffix("_child")
    for a, s in _statuses(h):
        if a.node != f.target or not f.t0 < a.t < f.t1:
            continue
        for child in s.get("children") or []:
            if child.get("name") != name:
                continue
            if child.get("pid") not in (None, f.pid) or not child.get("alive", True):
                return a.t  # killed (a fresh one follows at once) or already replaced
    return f.t1


def nothing_committed_lost(h: History) -> list[str]:
    """Within one run of a node's process a term or epoch never goes back (a restarted node replays its
    log, so it may pass through old epochs again), and every node ends at the top committed epoch."""
    out = []
    restarts = {
        node: sorted(f.t1 for f in h.faults if f.kind == "kill" and f.target == node) for node in h.nodes
    }
    high: dict[tuple[str, int], tuple[int, int]] = {}
    for a, s in _statuses(h):
        incarnation = (a.node, sum(1 for t in restarts.get(a.node, []) if t <= a.t))
        term, epoch = int(s.get("term") or 0), int(s.get("epoch") or 0)
        top_term, top_epoch = high.get(incarnation, (0, 0))
        if term < top_term:
            out.append(f"{a.node}'s term went back from {top_term} to {term} at {a.t:.3f}")
        if epoch < top_epoch:
            out.append(f"{a.node}'s epoch went back from {top_epoch} to {epoch} at {a.t:.3f}")
        high[incarnation] = (max(term, top_term), max(epoch, top_epoch))
    committed = _committed_epochs(h)
    if committed:
        top = max(committed)
        final = {a.node: int(s.get("epoch") or 0) for a, s in _statuses(h)}
        for node in h.nodes:
            if node not in h.crashed() and final.get(node, 0) < top:
                out.append(f"{node} ended at epoch {final.get(node, 0)}, below committed epoch {top}")
    return out


SPARE = "no layers assigned to this node in epoch "
"""How a node left out of the committed plan says so (the coordinator keeps a returning node spare
when planning it in would not speed the pipeline up): it has nothing to serve, and that is no fault."""


def recovery_time(h: History) -> float | None:
    """Seconds from the last heal until the cluster served again: every node answering /ready 200 in
    one epoch, except spares of that very epoch (at least a majority serving), or None if never."""
    ready: dict[str, Answer] = {}
    spare: dict[str, int] = {}
    majority = len(h.nodes) // 2 + 1
    live = [n for n in h.nodes if n not in h.crashed()]
    for a in h.answers:
        if a.kind == "ready":
            ready[a.node] = a
        elif a.kind == "status" and a.code == 200 and a.body:
            reason = str(a.body.get("waiting_reason") or "")
            spare[a.node] = (
                int(reason[len(SPARE) :])
                if reason.startswith(SPARE) and reason[len(SPARE) :].isdigit()
                else 0
            )
        else:
            continue
        if a.t < h.healed_at:
            continue
        serving = {
            n: int((r.body or {}).get("epoch") or 0) for n, r in ready.items() if r.code == 200 and n in live
        }
        epochs = set(serving.values())
        if len(serving) < majority or len(epochs) != 1:
            continue
        (epoch,) = epochs
        if all(n in serving or spare.get(n) == epoch for n in live):
            return a.t - h.healed_at
    return None


def recovers(h: History, recover_bound_s: float) -> list[str]:
    if h.leaderless():
        return []  # nobody may lead again: leaderless_says_why judges that outcome instead
    took = recovery_time(h)
    if took is None:
        return [
            f"the cluster was not OPERATIONAL on every node after the last heal (history to {h.ended_at:.3f})"
        ]
    if took > recover_bound_s:
        return [
            f"the cluster took {took:.1f} s after the last heal to be OPERATIONAL "
            f"(bound {recover_bound_s:g} s)"
        ]
    return []


@dataclass(frozen=True)
class Bounds:
    serve_bound_s: float = 2.0
    """A fault that takes a node's quorum or layers away stops serving within this (issue 10's goal)."""
    child_bound_s: float = 2.0
    """A hung child stops its node serving within this (the gate's 1 s staleness, plus slack)."""
    recover_bound_s: float = 90.0
    """After the last heal, every node is OPERATIONAL again within this (a busy 2-core machine)."""


def check(h: History, bounds: Bounds = Bounds()) -> list[str]:
    return [
        *one_leader_per_term(h),
        *serve_only_committed(h),
        *no_stale_serving(h, bounds.serve_bound_s),
        *faults_stop_serving(h, bounds.serve_bound_s, bounds.child_bound_s),
        *nothing_committed_lost(h),
        *workers_never_lead(h),
        *leaderless_says_why(h, bounds.serve_bound_s),
        *recovers(h, bounds.recover_bound_s),
    ]
