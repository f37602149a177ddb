"""The supervisor: the node's main process.

It owns the node's state and phase (the board's node section), the HTTP API, systemd notification,
signals and the children. Everything it reacts to arrives as one event stream: reports and exits from
the children, and flags set by signal handlers. Each reaction is logged in one line.

Decisions (why):
- Phases follow the cluster child's reports until this node has a plan; then the loader and the
  validator move it through loading_weights and validation. Validation ends when the coordinator
  accepted this node's unit digests against the manifest root (RangeAccepted), not when they were
  computed: only then is the node READY and systemd told READY=1. The cluster's committed
  "operational" entry is the only thing that makes it OPERATIONAL (no premature serving).
- While the node holds validated weights (READY, OPERATIONAL) the validator scrubs them. A mismatch
  stops serving at once (back to loading_weights, where the node is repaired, not failed): the loader
  reads the named tensors again (cache or source, verified), the validator re-validates, the
  coordinator accepts the range again, and the node returns to OPERATIONAL.
- A dead child is restarted with backoff, at most `restart_limit` times within `restart_window_s`,
  and the node falls back to the earliest phase whose work died with it (cluster -> discovery,
  loader -> loading_weights, validator -> re-run validation). Past the budget the node is FAILED,
  visibly, and keeps answering /status.
- A child whose heartbeat is older than heartbeat_timeout_s counts as hung: it is killed, which
  turns it into a dead child. A child that has not beaten once since its spawn is starting and gets
  CHILD_START_TIMEOUT_S instead (a loaded machine can take longer than a heartbeat timeout to start
  an interpreter). Serving stops much earlier, on a stale heartbeat (butterfly.gate). systemd's
  watchdog is fed only while every child is healthy.

This module must not do blocking I/O on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path

import msgspec

from butterfly.api.http import ApiServer, make_app, start_api
from butterfly.api.served import ServedModel, load_served_model
from butterfly.board import (
    Board,
    ClusterSection,
    EngineSection,
    LoaderSection,
    NodeSection,
    Section,
    ValidatorSection,
)
from butterfly.board.shm import remove_orphaned_segments, remove_stale_segments, unlink_segment
from butterfly.config import Config
from butterfly.gate import may_serve
from butterfly.hardware import detect
from butterfly.ipc import (
    ClusterOperational,
    ClusterProgress,
    EngineState,
    Failed,
    Init,
    Landing,
    LoadAssignment,
    Loaded,
    LocalValidated,
    NodeFault,
    PeerFaults,
    PlanAssigned,
    PlanView,
    RangeAccepted,
    Repaired,
    RepairTensors,
    Report,
    ScrubMismatch,
    Shutdown,
    StartCluster,
    StartEngine,
    StartScrub,
    StopEngine,
    StopScrub,
    TensorsLanded,
    ValidateArena,
    Validated,
    Waiting,
)
from butterfly.loader.arena import EarlyArena
from butterfly.loader.prewarm import prewarm
from butterfly.logs import LogControl
from butterfly.net.auth import load_secret
from butterfly.notify import Notifier
from butterfly.serving.backend import ServingError
from butterfly.serving.client import EntryTarget, RemoteBackend
from butterfly.serving.link import split_address
from butterfly.serving.metrics import ServingCollector, ServingStats
from butterfly.states import IllegalTransition, NodeState, Phase, phase_transition_allowed, state_for
from butterfly.status import ChildStatus, NodeStatus, Notes
from butterfly.supervisor.childproc import HEARTBEAT_S, held
from butterfly.supervisor.children import KINDS, ChildExited, ChildHandle, ChildReport, Event, RecentCount
from butterfly.supervisor.launcher import Launcher
from butterfly.supervisor.statusview import build_status, progress_line, status_line
from butterfly.supervisor.waitlog import WaitLog
from butterfly.weights.cache import CacheBusy, CacheLock, lock_shared

log = logging.getLogger("butterfly.supervisor")

# How often the health loop looks at children, feeds the watchdog and refreshes STATUS=.
HEALTH_INTERVAL_S = 0.5
# While loading and validating, a "progress" line goes to the log this often (and once as each begins).
PROGRESS_LOG_S = 10.0
# A load that keeps making progress asks systemd for this much more start-up time each time.
EXTEND_TIMEOUT_S = 30.0
# A child that has not beaten once since its spawn is still starting (interpreter start-up and imports
# can take many seconds on a loaded machine); it is killed as hung only after this long.
CHILD_START_TIMEOUT_S = 60.0
# How long a stop waits for the arena begun at start (cancelled between pieces, so seconds at most
# unless reading the manifest for its size hangs on a store that does not answer).
PREWARM_STOP_WAIT_S = 5.0
# Fatal errors from the loader/validator are retried this many times before the node fails.
PHASE_RETRIES = 1
# A child that cannot even be started (fork server or interpreter failing) is retried forever, the
# pause doubling from restart_backoff_s up to this cap; the node does not serve meanwhile.
RESPAWN_BACKOFF_CAP_S = 30.0
# Another node id's shared memory whose creator is gone is reclaimed once it is this old (seconds
# since last written): a node starting at this moment on the same host is never touched.
ORPHAN_SEGMENT_AGE_S = 60.0


# The board section each child writes.
CHILD_SECTIONS: dict[str, type[Section]] = {
    "cluster": ClusterSection,
    "loader": LoaderSection,
    "validator": ValidatorSection,
    "engine": EngineSection,
}


def segment_names(node_id: str) -> tuple[str, str]:
    base = f"butterfly-{node_id}-{os.getpid()}"
    return f"{base}-board", f"{base}-arena"


def hold_cache(cache_dir: Path) -> CacheLock | None:
    """The weight cache's shared lock, held while the node runs (a running clear-cache is waited for)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return lock_shared(cache_dir, blocking=False)
        except CacheBusy:
            log.info("waiting for the weight cache %s: butterfly-admin clear-cache is emptying it", cache_dir)
            return lock_shared(cache_dir)
    except OSError as e:
        # Preflight found the directory usable; if the lock still cannot be had, the node runs, but
        # clear-cache can no longer tell that it is in use.
        log.warning("cannot lock the weight cache %s (%s): clear-cache will not see this node", cache_dir, e)
        return None


class Supervisor:
    def __init__(self, config: Config, config_base_dir: Path, logs: LogControl | None = None) -> None:
        self.config = config
        self.logs = logs
        self.base_dir = config_base_dir
        self.node_id = config.node.id
        self.board_name, self.arena_name = segment_names(self.node_id)
        self.board: Board | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.launcher = Launcher()
        self.children = {k: ChildHandle(k, self.events, self.launcher) for k in KINDS}
        self.notifier = Notifier()
        self.api: ApiServer | None = None
        # The model the API serves: its tokenizer, loaded through the manifest once this node's range
        # is validated for an epoch (None until then, and /v1 answers 503).
        self.served: ServedModel | None = None
        # Serving: requests to this node go to the pipeline's entry over an encrypted stage link.
        self._secret_bytes: bytes | None = None
        self.serving_stats = ServingStats()
        self.engine_reason = ""
        # The engine's failed starts of its stage (a port taken, say): retried, and counted against
        # the child restart budget; ``engine_fault``: peers were told, and are told again once it serves.
        self.engine_failures = RecentCount()
        self.engine_fault = False
        self.backend = RemoteBackend(self._secret, self._entry_target)
        self.stop_requested = asyncio.Event()
        self.reopen_logs_requested = False
        self.phase = Phase.COLD_START
        self.operational = False
        self.plan: PlanAssigned | None = None
        self.loaded: Loaded | None = None
        # Every child started once (the cluster child first, the others beside the event loop).
        self.children_started = asyncio.Event()
        self.starting: asyncio.Task[None] | None = None
        # The load the validator follows (epoch, arena): what the loader's ``Landing`` announced.
        self.following: tuple[int, str] | None = None
        # The arena begun for the first loader (butterfly.loader.prewarm); None until run() starts it.
        self.prewarm: EarlyArena | None = None
        self.phase_failures = 0
        # Reasons kept whole for /status (the board holds none: its fields are fixed-size).
        self.notes = Notes()
        self.wait_log = WaitLog()
        self.ready_notified = False
        self.last_load_bytes = -1
        # model_bytes_downloaded_total counts since this supervisor started: what the loaders that
        # died read from the source, handed to each new loader (Init.downloaded_bytes) to count on
        # from. A loader's own count starts at what it is handed.
        self.loader_downloaded = 0
        self.exit_code = 0
        self._background: set[asyncio.Task[object]] = set()
        # A shared flock on the weight cache for as long as the node runs: `butterfly-admin
        # clear-cache` takes it exclusively, so it is refused while a node uses the cache.
        self.cache_lock: CacheLock | None = None

    # ---- board ---------------------------------------------------------------------------------

    def _board(self) -> Board:
        assert self.board is not None
        return self.board

    def _node(self) -> NodeSection:
        return self._board().read(NodeSection)

    def status(self) -> NodeStatus:
        snap = self._board().snapshot()
        now = time.monotonic_ns()
        beats = {
            "cluster": snap.cluster.heartbeat_mono_ns,
            "loader": snap.loader.heartbeat_mono_ns,
            "validator": snap.validator.heartbeat_mono_ns,
            "engine": snap.engine.heartbeat_mono_ns,
        }
        children = [
            ChildStatus(
                name=k,
                pid=h.pid,
                alive=h.alive,
                heartbeat_age_seconds=round((now - max(beats[k], h.spawned_mono_ns)) / 1e9, 3)
                if h.spawned_mono_ns
                else None,
                restarts=h.restarts,
                last_exit=h.last_exit,
                starting=h.alive and beats[k] < h.spawned_mono_ns,
            )
            for k, h in self.children.items()
        ]
        return build_status(
            snap, self.config.node.role, children, self.config.supervisor.heartbeat_timeout_s, now, self.notes
        )

    def _term(self) -> int:
        return self._board().snapshot().cluster.term if self.board else 0

    def set_phase(self, new: Phase, reason: str = "") -> None:
        old = self.phase
        if new == old:
            return
        if not phase_transition_allowed(old, new):
            raise IllegalTransition(f"phase {old.label} -> {new.label}")
        if new < Phase.READY:
            self.operational = False
        node = self._node()
        now = time.monotonic_ns()
        took = (now - node.phase_started_mono_ns) / 1e9
        durations = list(node.phase_durations)
        durations[old] = took
        old_state, new_state = state_for(old, self.operational), state_for(new, False)
        self.phase = new
        self._board().update(
            NodeSection,
            phase=int(new),
            state=int(new_state),
            # Any phase change ends serving: the gate needs set_operational for the new epoch again.
            serving_epoch=0,
            phase_started_mono_ns=now,
            phase_durations=tuple(durations),
        )
        term = self._term()
        states = f"{old_state.name} -> {new_state.name}" if old_state != new_state else old_state.name
        log.info(
            "phase %s -> %s, state %s, term %d, %s took %.3fs%s",
            old.label,
            new.label,
            states,
            term,
            old.label,
            took,
            f" ({reason})" if reason else "",
            extra={
                "fields": {
                    "PHASE": new.label,
                    "PREV_PHASE": old.label,
                    "STATE": new_state.name,
                    "TERM": term,
                    "DURATION_S": round(took, 6),
                }
            },
        )

    def advance_to(self, target: Phase, reason: str = "") -> None:
        """Walk forward one phase at a time (each logged), or fall back directly."""
        if target < self.phase:
            self.set_phase(target, reason)
        while self.phase < target:
            self.set_phase(Phase(self.phase + 1), reason)

    def set_operational(self, epoch: int) -> None:
        """The coordinator committed "operational at ``epoch``" and this node validated its range of
        it: from now on butterfly.gate decides, moment by moment, whether the node serves."""
        self.operational = True
        self._board().update(NodeSection, state=int(NodeState.OPERATIONAL), serving_epoch=epoch)
        log.info(
            "state READY -> OPERATIONAL at epoch %d, term %d",
            epoch,
            self._term(),
            extra={
                "fields": {
                    "STATE": "OPERATIONAL",
                    "PHASE": self.phase.label,
                    "TERM": self._term(),
                    "EPOCH": epoch,
                }
            },
        )

    def _fault(self, reason: str, failed: bool = False) -> NodeFault:
        held = self.plan or self.loaded
        start, stop = (held.start, held.stop) if held is not None else (0, 0)
        return NodeFault(reason, failed, start, stop)

    def _in_background(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def fail(self, source: str, reason: str) -> None:
        if self.phase is Phase.FAILED:
            return
        # Peers must see it at once: the cluster child puts it on its reports, and the coordinator
        # plans the others around this node.
        self._in_background(self.children["cluster"].send(self._fault(reason, failed=True)))
        self.notes.last_error = reason
        self._board().update(NodeSection, error_source=source)
        self.set_phase(Phase.FAILED, reason)
        log.error("node failed (%s): %s", source, reason, extra={"fields": {"ERROR_SOURCE": source}})
        self.notifier.status(f"FAILED: {reason}")
        self.exit_code = 1
        self._in_background(self._exit_after_failure(reason))

    async def _exit_after_failure(self, reason: str) -> None:
        """Failed for good: /status shows why for failed_exit_after_s, then the node exits 1 and
        systemd restarts it (a fresh start may well succeed: a disk that came back, a peer fixed)."""
        await asyncio.sleep(self.config.supervisor.failed_exit_after_s)
        log.error(
            "exiting with status 1 after failing (%s) so that systemd restarts the node",
            reason,
            extra={"fields": {"EXIT_STATUS": 1}},
        )
        self.stop_requested.set()

    # ---- children ------------------------------------------------------------------------------

    def _init(self, kind: str) -> Init:
        adopt = kind == "loader" and self.prewarm is not None and self.children[kind].generation == 0
        downloaded = self.loader_downloaded if kind == "loader" else 0
        return Init(
            self.config.to_toml(), str(self.base_dir), self.board_name, self.arena_name, adopt, downloaded
        )

    async def _start_children(self) -> None:
        """The cluster child first, and discovery at once; the others start beside the event loop (the
        loader's fork waits for the fork server's torch import, a second or more), so the cluster's
        progress is followed as it comes. A plan waits for them (``children_started``)."""
        cluster = self.children["cluster"]
        await cluster.spawn(self._init("cluster"))
        self.advance_to(Phase.DISCOVERY)
        await cluster.send(StartCluster())
        self.starting = asyncio.create_task(self._start_others())

    async def _children_up(self) -> bool:
        """Wait until every child has been started once (at a node's start the loader may still be
        starting); False when the node is stopping meanwhile."""
        if not self.children_started.is_set():
            waits = [asyncio.create_task(e.wait()) for e in (self.children_started, self.stop_requested)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        return not self.stop_requested.is_set()

    async def _start_others(self) -> None:
        kind = ""
        try:
            for handle in self.children.values():
                if handle.proc is None:
                    kind = handle.kind
                    while held(f"spawn-{kind}"):  # test hook: a child that takes long to start
                        await asyncio.sleep(0.05)
                    await handle.spawn(self._init(kind))
        except Exception as e:
            log.exception("cannot start the %s child", kind)
            self.fail("cold_start", f"cannot start the {kind} child: {type(e).__name__}: {e}")
        finally:
            self.children_started.set()

    async def on_exit(self, ev: ChildExited) -> None:
        handle = self.children[ev.kind]
        if ev.generation != handle.generation:
            return
        handle.last_exit = ev.describe()
        if ev.kind == "loader":
            # The dead loader's last published count (it counted on from what it was given): the
            # next loader goes on from there, so the counter never falls back.
            left = self._board().read_unwritten(LoaderSection).bytes_downloaded_total
            self.loader_downloaded = max(self.loader_downloaded, left)
        self._clear_dead_section(ev.kind)
        if self.stop_requested.is_set():
            return
        deaths = handle.record_death(self.config.supervisor.restart_window_s)
        log.error(
            "%s child pid %s %s (%d in the last %.0fs)",
            ev.kind,
            handle.pid,
            ev.describe(),
            deaths,
            self.config.supervisor.restart_window_s,
            extra={"fields": {"CHILD": ev.kind, "EXIT": ev.describe()}},
        )
        if self.phase is Phase.FAILED:
            return
        if deaths > self.config.supervisor.restart_limit:
            self.fail(
                ev.kind,
                f"{ev.kind} child {ev.describe()} {deaths} times within "
                f"{self.config.supervisor.restart_window_s:.0f}s",
            )
            return
        # Serving stops now, not when the dead child's heartbeat goes stale.
        resume_epoch = self._node().serving_epoch
        self._board().update(NodeSection, serving_epoch=0)
        await asyncio.sleep(self.config.supervisor.restart_backoff_s * (2 ** (deaths - 1)))
        if not await self._respawn(handle):
            return
        await self._resume_after_restart(ev.kind)
        if resume_epoch and self.operational and self.phase is Phase.READY and self.plan is not None:
            if self.plan.epoch == resume_epoch:
                # Nothing this node serves died with the child (the validator only scrubs).
                self._board().update(NodeSection, serving_epoch=resume_epoch)
        # Counted once the replacement runs and the node has fallen back to the phase it resumes from:
        # /status never shows a restart whose child (pid) and phase are still the dead one's.
        handle.restarts += 1
        self._board().update(NodeSection, child_restarts=sum(h.restarts for h in self.children.values()))

    def _clear_dead_section(self, kind: str) -> None:
        """Write the dead child's board section on its behalf (nobody else writes it until the next
        child does): no heartbeat, and an engine serves nothing. Left as the dead child wrote them, the
        gate would let the node serve again, once ``serving_epoch`` is back, on a dead engine's last
        beat (fresh for up to a second) until the new engine's first write."""
        changes = {"heartbeat_mono_ns": 0}
        if kind == "engine":
            changes.update(serving=0, epoch=0, running=0, waiting=0, kv_bytes_in_use=0)
        board = self._board()
        board.write(dataclasses.replace(board.read_unwritten(CHILD_SECTIONS[kind]), **changes))

    async def _respawn(self, handle: ChildHandle) -> bool:
        """Start ``handle``'s child again, retrying a failed start forever with capped backoff;
        False when the node is stopping."""
        delay = max(self.config.supervisor.restart_backoff_s, 0.05)
        attempt = 0
        while not self.stop_requested.is_set():
            try:
                if held(f"spawn-{handle.kind}"):
                    raise OSError("starting it is held by a test")
                await handle.spawn(self._init(handle.kind))
                if attempt:
                    self.notes.last_error = ""
                    log.info("%s child started after %d failed attempt(s)", handle.kind, attempt)
                return True
            except Exception as e:  # a start that fails (fork server, interpreter, fds) is retried
                attempt += 1
                self.notes.last_error = (
                    f"{handle.kind} child could not be started ({type(e).__name__}: {e}); "
                    f"retrying in {delay:.1f}s (attempt {attempt})"
                )
                self._board().update(NodeSection, error_source=handle.kind)
                log.error("%s", self.notes.last_error, extra={"fields": {"CHILD": handle.kind}})
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESPAWN_BACKOFF_CAP_S)
        return False

    async def _resume_after_restart(self, kind: str) -> None:
        if kind == "cluster":
            # Cluster knowledge died with it: rejoin. A plan equal to what is loaded skips the load.
            self.plan = None
            if self.phase > Phase.DISCOVERY:
                self.advance_to(Phase.DISCOVERY, "cluster child restarted")
            await self.children["cluster"].send(StartCluster())
        elif kind == "loader":
            self.loaded = None
            if self.phase >= Phase.LOADING_WEIGHTS and self.plan is not None:
                self.advance_to(Phase.LOADING_WEIGHTS, "loader child restarted")
                await self._load(self.plan)
        elif kind == "validator" and self.phase is Phase.VALIDATION and self.loaded is not None:
            await self.children["validator"].send(ValidateArena(self.loaded.epoch, self.loaded))
        elif kind == "validator" and self.phase is Phase.READY:
            await self._start_scrub()
        elif kind == "engine" and self.phase is Phase.READY:
            await self._start_engine()

    async def _load(self, plan: PlanAssigned, refetch: bool = False) -> None:
        # The validator and the engine let go of the arena before the loader replaces it.
        self.following = None
        await self.children["validator"].send(StopScrub())
        await self.children["engine"].send(StopEngine())
        await self.children["loader"].send(
            LoadAssignment(plan.epoch, plan.term, plan.start, plan.stop, refetch=refetch)
        )

    # ---- reports -------------------------------------------------------------------------------

    async def on_report(self, ev: ChildReport) -> None:
        if ev.generation != self.children[ev.kind].generation:
            return
        r: Report = ev.report
        if isinstance(r, PeerFaults):
            self.notes.peer_faults = r.faults
            return
        if isinstance(r, PlanView):
            self.notes.plan = r
            return
        if self.phase is Phase.FAILED:
            return
        if isinstance(r, ClusterProgress):
            target = Phase[r.phase.upper()]
            if self.plan is None and target >= Phase.DISCOVERY:
                self.advance_to(target, r.waiting_reason)
            elif self.plan is not None and r.waiting_reason and target <= Phase.ASSIGNMENT:
                # Lost the coordinator, or the new plan leaves this node out: stop serving and wait.
                # What is loaded stays in the arena; a plan for the same blocks only re-validates.
                self.plan = None
                self.advance_to(target, r.waiting_reason)
            line = self.wait_log.line(r.waiting_reason, time.monotonic())
            if line:
                log.warning("waiting: %s", line, extra={"fields": {"PHASE": self.phase.label}})
        elif isinstance(r, Waiting):
            self.notes.waiting_reason = r.reason
        elif isinstance(r, PlanAssigned):
            await self.on_plan(r)
        elif isinstance(r, Landing | TensorsLanded):
            # The validator hashes the tensors beside the stream (butterfly.validator.follow).
            if self.plan is None or r.epoch != self.plan.epoch or self.phase is not Phase.LOADING_WEIGHTS:
                return
            if isinstance(r, Landing):
                self.following = (r.epoch, r.arena_name)
            await self.children["validator"].send(r)
        elif isinstance(r, Loaded):
            if self.plan is None or r.epoch != self.plan.epoch:
                log.info("dropping load result for stale epoch %d", r.epoch)
                return
            self.loaded = r
            steps = ", ".join(f"{k} {v:.3f}s" for k, v in r.step_seconds.items())
            log.info("loaded blocks %d-%d: %d bytes (%s)", r.start, r.stop - 1, r.arena_bytes, steps)
            self.advance_to(Phase.VALIDATION)
            follow, self.following = self.following == (r.epoch, r.arena_name), None
            await self.children["validator"].send(ValidateArena(r.epoch, r, follow=follow))
        elif isinstance(r, Validated):
            await self.on_validated(r)
        elif isinstance(r, RangeAccepted):
            await self.on_range_accepted(r)
        elif isinstance(r, ScrubMismatch):
            await self.on_scrub_mismatch(r)
        elif isinstance(r, Repaired):
            await self.on_repaired(r)
        elif isinstance(r, ClusterOperational):
            if self.phase is Phase.READY and self.plan is not None and r.epoch == self.plan.epoch:
                self.set_operational(r.epoch)
        elif isinstance(r, EngineState):
            self.on_engine_state(r)
        elif isinstance(r, Failed):
            await self.on_failed(ev.kind, r)

    async def on_plan(self, plan: PlanAssigned) -> None:
        self.plan = plan
        self.phase_failures = 0
        self.advance_to(
            Phase.ASSIGNMENT, f"new plan epoch {plan.epoch}" if self.phase > Phase.ASSIGNMENT else ""
        )
        log.info(
            "assigned blocks %d-%d of %d at epoch %d, term %d",
            plan.start,
            plan.stop - 1,
            plan.num_blocks,
            plan.epoch,
            plan.term,
            extra={"fields": {"EPOCH": plan.epoch, "TERM": plan.term}},
        )
        self.advance_to(Phase.LOADING_WEIGHTS)
        if not await self._children_up():
            return
        if self.loaded is not None and (self.loaded.start, self.loaded.stop) == (plan.start, plan.stop):
            # Same blocks still in the arena (a cluster-child restart): re-validate them, no reload.
            self.loaded = msgspec.structs.replace(self.loaded, epoch=plan.epoch, step_seconds={})
            self.advance_to(Phase.VALIDATION)
            await self.children["validator"].send(ValidateArena(plan.epoch, self.loaded))
            return
        self.loaded = None
        await self._load(plan)

    async def on_validated(self, r: Validated) -> None:
        if self.plan is None or self.loaded is None or r.epoch != self.plan.epoch:
            return
        log.info(
            "validated %d bytes locally, merkle root %s: proving blocks %d-%d to the coordinator",
            r.bytes_hashed,
            r.root.hex(),
            self.plan.start,
            self.plan.stop - 1,
            extra={"fields": {"MERKLE_ROOT": r.root.hex()}},
        )
        await self.children["cluster"].send(
            LocalValidated(r.epoch, self.plan.term, self.plan.start, self.plan.stop, r.units, r.unit_digests)
        )

    async def on_range_accepted(self, r: RangeAccepted) -> None:
        """This node's range passed validation: READY, and the one READY=1 systemd gets."""
        if self.phase is not Phase.VALIDATION or self.plan is None or r.epoch != self.plan.epoch:
            return
        await self.children["cluster"].send(self._fault(""))
        self.advance_to(Phase.READY)
        self._in_background(self._load_tokenizer(r.epoch))
        if not self.ready_notified:
            self.ready_notified = True
            self.notifier.ready()
        await self._start_scrub()
        await self._start_engine()

    # ---- serving -------------------------------------------------------------------------------

    async def _start_engine(self) -> None:
        """The engine child builds this node's stage over the validated arena and joins the ring."""
        if self.loaded is not None and self.plan is not None and self.loaded.epoch == self.plan.epoch:
            await self.children["engine"].send(StartEngine(self.plan.epoch, self.loaded, self.plan.stages))

    def _entry_target(self) -> EntryTarget:
        """Where requests to this node go: the pipeline's entry, if this node may serve now."""
        verdict = may_serve(self._board().snapshot(), time.monotonic_ns())
        if not verdict.ok:
            raise ServingError(503, "service_unavailable", f"this node is not serving: {verdict.reason}")
        plan = self.plan
        if plan is None or plan.epoch != verdict.epoch or not plan.stages:
            raise ServingError(503, "service_unavailable", "this node does not know the pipeline's stages")
        entry = plan.stages[0]
        try:
            host, port = split_address(entry.engine_address)
        except ValueError as e:
            raise ServingError(503, "service_unavailable", f"the pipeline's entry is unknown: {e}") from None
        return EntryTarget(
            host, port, plan.epoch, f"the pipeline's entry (node {entry.node_id} at {host}:{port})"
        )

    def _secret(self) -> bytes:
        if self._secret_bytes is None:
            self._secret_bytes = load_secret(self.config.security.secret_file)
        return self._secret_bytes

    def on_engine_state(self, r: EngineState) -> None:
        stats = self.serving_stats
        stats.running, stats.waiting = r.running, r.waiting
        stats.kv_bytes_in_use, stats.kv_bytes_total = r.kv_bytes_in_use, r.kv_bytes_total
        stats.observe_hops(r.hop_seconds)
        if r.step_failures:
            stats.observe_step_failures(r.step_failures)
        if r.serving and self.engine_fault:
            self.engine_fault = False
            self._in_background(self.children["cluster"].send(self._fault("")))
        if r.reason != self.engine_reason:
            self.engine_reason = r.reason
            if r.reason:
                log.warning("the pipeline is not serving: %s", r.reason)

    async def _load_tokenizer(self, epoch: int) -> None:
        """The API's tokenizer for the model version this epoch's range was validated against."""
        root = self._board().snapshot().cluster.model_root
        if not root or (self.served is not None and self.served.root == root):
            return
        try:
            served = await asyncio.to_thread(load_served_model, self.config, root)
        except Exception as e:  # every way of not having it ends the same: /v1 answers 503, say why
            log.error("cannot load the model's tokenizer for epoch %d: %s", epoch, e)
            return
        if self._board().snapshot().cluster.model_root == root:
            self.served = served
            log.info(
                "serving model %s (version %s, context %d tokens)",
                served.id,
                root[:16],
                served.tokenizer.context_length,
            )

    # ---- scrubbing and repair ----------------------------------------------------------------

    async def _start_scrub(self) -> None:
        if self.config.validator.scrub and self.loaded is not None:
            await self.children["validator"].send(StartScrub(self.loaded.epoch, self.loaded))

    async def on_scrub_mismatch(self, r: ScrubMismatch) -> None:
        """Weights in memory changed: stop serving now, repair the tensors, prove the range again."""
        if (
            self.plan is None
            or self.loaded is None
            or r.epoch != self.loaded.epoch
            or self.phase < Phase.READY
        ):
            return
        self.notes.last_error = r.reason
        self.notes.mismatches = r.mismatches
        self._board().update(NodeSection, error_source="scrub")
        log.error(
            "weights in memory changed, not serving until repaired: %s",
            r.reason,
            extra={"fields": {"ERROR_SOURCE": "scrub", "TENSORS": ",".join(m.tensor for m in r.mismatches)}},
        )
        self.advance_to(Phase.LOADING_WEIGHTS, "repairing weights that changed in memory")
        await self.children["cluster"].send(self._fault(f"repairing weights in memory: {r.reason}"))
        await self.children["loader"].send(RepairTensors(r.epoch, [m.tensor for m in r.mismatches]))

    async def on_repaired(self, r: Repaired) -> None:
        if self.loaded is None or r.epoch != self.loaded.epoch or self.phase is not Phase.LOADING_WEIGHTS:
            return
        repairs = self._node().repairs + 1
        self._board().update(NodeSection, repairs=repairs)
        log.info(
            "repaired %s (%d from the cache, %d from the source): validating again",
            ", ".join(r.tensors),
            r.from_cache,
            r.from_source,
        )
        self.advance_to(Phase.VALIDATION)
        await self.children["validator"].send(ValidateArena(self.loaded.epoch, self.loaded))

    async def on_failed(self, kind: str, r: Failed) -> None:
        log.error(
            "%s reports %s failed: %s",
            kind,
            r.what,
            r.reason,
            extra={"fields": {"CHILD": kind, "ERROR_SOURCE": r.what}},
        )
        self.notes.last_error = r.reason
        self._board().update(NodeSection, error_source=r.what)
        if kind == "engine" and not r.fatal:
            await self._engine_failed(r)
            return
        self.phase_failures += 1
        if r.fatal or self.phase_failures > PHASE_RETRIES or self.plan is None:
            self.fail(r.what, r.reason)
            return
        # A validation mismatch or a transient load error: reload the assignment from the source,
        # bypassing (and clearing) cached copies of its tensors. Peers see why meanwhile.
        await self.children["cluster"].send(self._fault(r.reason))
        self.loaded = None
        self.advance_to(Phase.LOADING_WEIGHTS, f"retrying after: {r.reason}")
        await asyncio.sleep(self.config.supervisor.restart_backoff_s)
        await self._load(self.plan, refetch=True)

    async def _engine_failed(self, r: Failed) -> None:
        """The engine could not build or open its stage over the validated arena (its port taken, a
        secret it cannot read). The weights are not at fault and stay: the stage is started again after
        the child restart backoff, and the node fails only when that keeps happening (more than
        ``restart_limit`` times within ``restart_window_s``, as for a child's deaths)."""
        sup = self.config.supervisor
        failures = self.engine_failures.record(sup.restart_window_s)
        if failures > sup.restart_limit:
            self.fail("engine", f"{r.reason} ({failures} times within {sup.restart_window_s:.0f}s)")
            return
        self.engine_fault = True
        await self.children["cluster"].send(self._fault(r.reason))
        delay = min(sup.restart_backoff_s * (2 ** (failures - 1)), RESPAWN_BACKOFF_CAP_S)
        log.warning("starting the engine's stage again in %.1fs", delay)
        self._in_background(self._restart_stage(delay))

    async def _restart_stage(self, delay: float) -> None:
        await asyncio.sleep(delay)
        # A new plan meanwhile starts the engine itself once its range is validated.
        if self.phase is not Phase.READY or self.plan is None:
            return
        engine = self._board().read(EngineSection)
        if not (engine.serving and engine.epoch == self.plan.epoch):
            await self._start_engine()

    # ---- health, watchdog, systemd ------------------------------------------------------------

    async def health_loop(self) -> None:
        interval = min(HEALTH_INTERVAL_S, self.notifier.watchdog_interval() or HEALTH_INTERVAL_S)
        last_text = ""
        timeout = self.config.supervisor.heartbeat_timeout_s
        last = time.monotonic()
        grace_until = 0.0
        # (phase, when) of the last progress line: one as loading (once its size is known) or
        # validation begins, then one every PROGRESS_LOG_S.
        progress_logged: tuple[Phase, float] | None = None
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            late, last = now - last - interval, now
            if late > timeout / 2:
                # We were not scheduled either (a stalled machine, a suspended VM): the children's
                # silence says nothing about them. Give them a full timeout to beat again.
                grace_until = now + timeout
                log.warning("supervisor loop ran %.1fs late: not judging heartbeats for %.0fs", late, timeout)
            if self.reopen_logs_requested:
                self.reopen_logs_requested = False
                self.on_reopen_logs()
            st = self.status()
            for c in st.children:
                age = c.heartbeat_age_seconds
                limit = CHILD_START_TIMEOUT_S if c.starting else timeout
                if now >= grace_until and c.alive and age is not None and age > limit:
                    what = "did not start within" if c.starting else "missed heartbeats for"
                    log.error("%s child pid %s %s %.1fs: killing it", c.name, c.pid, what, age)
                    self.children[c.name].kill()
            self._board().update(NodeSection, watchdog_ok=int(st.healthy))
            if st.healthy:
                self.notifier.watchdog()
            text = status_line(st)
            if text != last_text:
                self.notifier.status(text)
                last_text = text
            if (
                self.phase in (Phase.LOADING_WEIGHTS, Phase.VALIDATION)
                and st.bytes_total
                and (
                    progress_logged is None
                    or progress_logged[0] is not self.phase
                    or now - progress_logged[1] >= PROGRESS_LOG_S
                )
            ):
                progress_logged = (self.phase, now)
                fields: dict[str, object] = {"PROGRESS_PERCENT": st.progress_percent}
                if st.eta_seconds is not None:
                    fields["ETA_S"] = st.eta_seconds
                log.info(progress_line(st), extra={"fields": fields})
            if self.phase is Phase.LOADING_WEIGHTS and st.bytes_done != self.last_load_bytes:
                self.last_load_bytes = st.bytes_done
                self.notifier.extend_timeout(int(EXTEND_TIMEOUT_S * 1e6))

    async def beat_loop(self) -> None:
        """The supervisor's own heartbeat: butterfly.gate stops serving when this loop stalls."""
        while True:
            self._board().update(NodeSection, heartbeat_mono_ns=time.monotonic_ns())
            await asyncio.sleep(HEARTBEAT_S)

    def on_reopen_logs(self) -> None:
        if self.logs is not None:
            self.logs.reopen()
            log.info("log file reopened (SIGHUP)")

    # ---- lifecycle -----------------------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        # Handlers only set flags; the loop acts on them.
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: setattr(self, "reopen_logs_requested", True))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        for name in remove_stale_segments(self.node_id):
            log.warning("removed stale shared memory %s left by a previous run", name)
        for name in remove_orphaned_segments(ORPHAN_SEGMENT_AGE_S):
            log.warning("removed shared memory %s of a node that is no longer running", name)
        self.board = Board.create(self.board_name, self.node_id)
        self.cache_lock = await asyncio.to_thread(hold_cache, self.config.node.cache_dir)
        now = time.monotonic_ns()
        self.board.update(
            NodeSection,
            state=int(NodeState.COLD),
            phase=int(Phase.COLD_START),
            started_mono_ns=now,
            phase_started_mono_ns=now,
        )
        log.info(
            "node %s starting: state COLD, phase cold_start",
            self.node_id,
            extra={"fields": {"PHASE": "cold_start", "STATE": "COLD", "TERM": 0}},
        )
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(self.beat_loop())]
        try:
            # First: the arena's pages are reserved and the fork server imports the children's modules
            # while we detect and open the API.
            self.prewarm = prewarm(self.config, self.arena_name)
            await self.launcher.start()
            hw = await asyncio.to_thread(detect, self.config.node.gpu)
            log.info(
                "hardware: %d CPUs, %.1f GiB RAM, %s",
                hw.cpu_count,
                hw.memory_bytes / 2**30,
                ", ".join(f"{g.name} ({g.memory_bytes / 2**30:.0f} GiB)" for g in hw.gpus) or "no GPU",
            )
            if self.config.node.gpu == "required" and not hw.gpus:
                self.fail("cold_start", 'node.gpu = "required" but no GPU was found')
            host, port = self.config.api.listen
            self.api = await start_api(
                make_app(
                    self.status, self.backend, lambda: self.served, [ServingCollector(self.serving_stats)]
                ),
                host,
                port,
            )
            if self.phase is not Phase.FAILED:
                await self._start_children()
            tasks.append(asyncio.create_task(self.health_loop()))
            await self._event_loop()
        finally:
            for t in tasks:
                t.cancel()
            await self.shutdown()
        return self.exit_code

    async def _event_loop(self) -> None:
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            while not self.stop_requested.is_set():
                get = asyncio.create_task(self.events.get())
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                ev = get.result()
                if isinstance(ev, ChildExited):
                    # Restarts sleep (backoff); run them beside the loop so reports keep flowing.
                    asyncio.create_task(self.on_exit(ev))
                else:
                    await self.on_report(ev)
        finally:
            stop.cancel()

    async def shutdown(self) -> None:
        self.stop_requested.set()
        self.notifier.stopping()
        log.info("stopping: children first, then the API and shared memory")
        timeout = self.config.supervisor.stop_timeout_s
        if self.prewarm is not None:
            self.prewarm.cancel()  # a node stopped in its first seconds: no arena made after the unlink
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()  # no child started after the others were told to stop
            with contextlib.suppress(asyncio.CancelledError):
                await self.starting
        await asyncio.gather(*(h.stop(Shutdown(), timeout) for h in self.children.values()))
        if self.prewarm is not None and not await asyncio.to_thread(
            self.prewarm.wait, lambda: None, PREWARM_STOP_WAIT_S
        ):
            log.warning(
                "the arena begun at start is still being made (its manifest read hangs?); not waiting"
            )
        await self.launcher.close()
        await self.backend.close()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.close()
        if self.board is not None:
            self.board.close()
        unlink_segment(self.board_name)
        unlink_segment(self.arena_name)
        if self.cache_lock is not None:
            self.cache_lock.release()
        log.info("stopped", extra={"fields": {"PHASE": self.phase.label}})
