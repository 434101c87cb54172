"""Collectives that never hang silently: which operation each rank is in, and who is missing.

Every process group has a timeout (``parallel.collective_timeout_s``, applied by
``deepspeed_setup``), so a collective waiting for a rank that died or stalled raises on the
ranks still there. That error says nothing useful ("Timed out waiting 600000ms for recv",
"Connection closed by peer"), and a hung collective may not raise at all; this module turns it
into one line that names the operation, the step and the missing rank, then stops the process
with :data:`EXIT_CODE` so that a supervisor (``moe launch``'s Ray Train) restarts the job from
its last committed checkpoint.

How:
- The trainer and the expert-parallel dispatcher wrap each collective in
  :meth:`CollectiveWatchdog.collective` (a label such as "all_to_all (dispatch, MoE layer 1)"),
  which records the operation and counts it (``seq``): every rank runs the same collectives in
  the same order, so (step, seq) says how far a rank got.
- A daemon thread publishes a heartbeat (a beat counter, step, seq, operation and how long it has
  been in it) to the rendezvous store every ``period`` seconds. A process that died stops beating;
  a stalled one beats but its (step, seq) stays behind.
- When a collective raises a communication error, or a timed collective is still running
  ``grace`` seconds after the timeout, the rank reads everyone's heartbeat twice, ``window``
  seconds apart (beats, not clocks, so hosts need not agree on the time), names the ranks that
  stopped beating or never reached the operation, prints it, and leaves with ``os._exit`` (a hung
  collective cannot be interrupted, and clean-up could wait on it again). Its flag in the store
  makes the other ranks stop too, even one stalled outside any collective.

Not a collective itself: nothing here waits for another rank, so it cannot hang the job.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

EXIT_CODE = 75  # EX_TEMPFAIL: the job may succeed when restarted (from its last checkpoint)
KEY_PREFIX = "dynamoe/watchdog"
# Test aid: "RANK:STEP:OP:ACTION" makes rank RANK, at step STEP, on reaching the first collective
# whose label starts with OP, either die at once (ACTION "kill": SIGKILL) or stall outside the
# collective ("sleep=SECONDS"). With DYNAMOE_FAULT_MARKER=PATH it fires once: only while PATH
# does not exist, which it then creates (so a restarted job runs clean).
FAULT_ENV = "DYNAMOE_FAULT"
FAULT_MARKER_ENV = "DYNAMOE_FAULT_MARKER"
# Ray Train and torchrun stop a worker group themselves; the store lives in the agent under torchrun.
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` comes from a collective that lost a peer or timed out (gloo raises plain
    RuntimeErrors; NCCL and the store raise ``DistError`` subclasses)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    markers = ("gloo", "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "NCCL")
    return any(m in text for m in markers)


def timings(timeout_s: float) -> tuple[float, float, float]:
    """(heartbeat period, diagnosis window, grace after the timeout), all in seconds.

    A live rank beats at least twice in a window, so one beat delayed by a busy host is no
    false alarm; the worst case, grace + window + the rank-0 linger (each <= 6 s at the
    default 600 s), stays within the promised timeout + 30 s."""
    period = min(2.0, max(0.2, timeout_s / 30))
    window = 2.5 * period + 1.0
    grace = min(5.0, max(1.0, timeout_s / 10))
    return period, window, grace


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    op: str
    action: str  # "kill" or "sleep"
    seconds: float = 0.0

    @staticmethod
    def parse(text: str) -> Fault:
        fix = f"fix: set {FAULT_ENV} to RANK:STEP:OP:kill or RANK:STEP:OP:sleep=SECONDS, e.g. 1:3:all_to_all:kill"
        parts = text.split(":")
        try:
            rank, step, op, action = int(parts[0]), int(parts[1]), parts[2], parts[3]
            if len(parts) != 4 or not op:
                raise ValueError
            if action == "kill":
                return Fault(rank, step, op, "kill")
            name, _, seconds = action.partition("=")
            if name != "sleep" or float(seconds) <= 0:
                raise ValueError
            return Fault(rank, step, op, "sleep", float(seconds))
        except (ValueError, IndexError):
            raise ValueError(f"{FAULT_ENV}={text!r} is not a fault this test aid knows; {fix}") from None


def fault_from_env() -> Fault | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker and os.path.exists(marker):
        return None
    return Fault.parse(text)


@dataclass(frozen=True)
class PeerReport:
    rank: int
    missing: bool  # counted as a cause of the failure
    text: str


def assess_peers(me: int, world: int, step: int, seq: int, first: dict, second: dict) -> list[PeerReport]:
    """What each other rank was doing, from two reads of the heartbeats a window apart (rank ->
    heartbeat dict, or absent). A rank that stopped beating is missing (dead or frozen); one that
    beats but has not reached (step, seq) is missing (stalled elsewhere); one that flagged the
    failure itself, or waits in the same collective, is not."""
    reports = []
    for rank in range(world):
        if rank == me:
            continue
        a, b = first.get(rank), second.get(rank)
        if (a and a.get("failed")) or (b and b.get("failed")):
            failed = (b or a)["failed"]
            reports.append(PeerReport(rank, False, f"rank {rank} hit the failure too ({failed})"))
        elif b is None:
            reports.append(PeerReport(rank, True, f"rank {rank} never published a heartbeat"))
        elif a is not None and a["beat"] == b["beat"]:
            reports.append(
                PeerReport(rank, True, f"rank {rank} stopped answering (no heartbeat: its process died or froze)")
            )
        elif (b["step"], b["seq"]) < (step, seq):
            where = (
                f"in {b['op']} for {b['elapsed_s']:.0f} s"
                if b["op"]
                else f"outside any collective for {b['elapsed_s']:.0f} s"
            )
            reports.append(
                PeerReport(rank, True, f"rank {rank} is alive but never reached it: at step {b['step']}, {where}")
            )
        else:
            reports.append(PeerReport(rank, False, f"rank {rank} was waiting in the same collective"))
    return reports


def _ranks(ranks: list[int]) -> str:
    names = [str(r) for r in ranks]
    return "rank " + names[0] if len(names) == 1 else "ranks " + ", ".join(names[:-1]) + " and " + names[-1]


class CollectiveWatchdog:
    """Marks the collectives of one rank and stops the job, with a diagnosis, when one fails.

    ``store`` (a c10d store shared by all ranks) carries the heartbeats; None with one process,
    where there is nothing to watch. ``exit_fn`` and ``stream`` are seams for tests.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        timeout_s: float,
        store=None,
        *,
        exit_fn=os._exit,
        stream=None,
        linger: bool | None = None,
    ):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.period, self.window, self.grace = timings(timeout_s)
        self.store = store
        self.step = 0
        self.seq = 0
        self._ops: list[tuple[str, bool, float]] = []  # (label, timed, started) innermost last
        self._idle_since = time.monotonic()
        self._beat = 0
        self._failed: str | None = None  # what this rank found, kept in every later heartbeat
        self._failing = threading.Lock()
        self._exit_fn = exit_fn
        self._stream = stream
        # The store lives in rank 0 unless an agent (torchrun) hosts it: rank 0 then waits a
        # window before leaving, so that the other ranks can still read it for their diagnosis.
        self._linger = rank == 0 and os.environ.get(AGENT_STORE_ENV) != "True" if linger is None else linger
        self.fault = fault_from_env() if world > 1 else None
        self._stop = threading.Event()
        self._thread = None
        if store is not None and world > 1:
            self._publish()
            self._thread = threading.Thread(
                target=_watch, args=(weakref.ref(self), self._stop), name="dynamoe-watchdog", daemon=True
            )
            self._thread.start()
            # At interpreter exit a daemon thread still inside a store call (C++) is killed by a
            # forced unwind, which aborts the process ("terminate called without an active
            # exception") after a job that succeeded: stop it first. Exit handlers run before that.
            atexit.register(_join_heartbeat, self._stop, self._thread)

    # --- marking ------------------------------------------------------------------------------

    @contextmanager
    def collective(self, op: str, *, timed: bool = True):
        """Run the body as collective ``op``. ``timed``: the body is one collective, bounded by the
        timeout (an outer span that also computes, such as the backward pass, is not)."""
        if self.world == 1:
            yield
            return
        if self.fault is not None:
            self._maybe_inject(op)
        self.seq += 1
        self._ops.append((op, timed, time.monotonic()))
        try:
            yield
        except Exception as err:
            if is_communication_error(err):
                self.fail(f"{type(err).__name__}: {_first_line(err)}")
            raise
        finally:
            self._ops.pop()
            if not self._ops:
                self._idle_since = time.monotonic()

    def _maybe_inject(self, op: str) -> None:
        f = self.fault
        if f.rank != self.rank or f.step != self.step or not op.startswith(f.op):
            return
        self.fault = None
        marker = os.environ.get(FAULT_MARKER_ENV)
        if marker:
            open(marker, "w").close()
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(f.seconds)

    def current(self) -> str | None:
        """The innermost collective with the spans around it, e.g. "all_reduce (...) in checkpoint"."""
        if not self._ops:
            return None
        inner, *outer = reversed([label for label, _, _ in self._ops])
        return inner + "".join(f" in {label}" for label in outer)

    # --- heartbeats ---------------------------------------------------------------------------

    def _key(self, rank: int) -> str:
        return f"{KEY_PREFIX}/rank{rank}"

    def _publish(self) -> None:
        self._beat += 1
        ops = list(self._ops)  # the main thread changes it; take one consistent copy
        now = time.monotonic()
        heartbeat = {
            "beat": self._beat,
            "step": self.step,
            "seq": self.seq,
            "op": self.current() if ops else None,
            "elapsed_s": now - (ops[-1][2] if ops else self._idle_since),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "failed": self._failed,
        }
        self.store.set(self._key(self.rank), json.dumps(heartbeat))

    def _read_all(self) -> dict:
        beats = {}
        for rank in range(self.world):
            if rank != self.rank and self.store.check([self._key(rank)]):
                beats[rank] = json.loads(self.store.get(self._key(rank)))
        return beats

    def overdue(self) -> str | None:
        """The timed collective this rank has waited in longer than timeout + grace, if any."""
        ops = list(self._ops)
        if ops and ops[-1][1] and time.monotonic() - ops[-1][2] > self.timeout_s + self.grace:
            return self.current()
        return None

    def peer_failure(self) -> str | None:
        """The diagnosis another rank flagged in the store, if one did."""
        key = f"{KEY_PREFIX}/failed"
        if self.store.check([key]):
            return self.store.get(key).decode()
        return None

    # --- failing ------------------------------------------------------------------------------

    def fail(self, cause: str) -> None:
        """Diagnose the collective this rank is in, print it and stop the process (never returns
        unless ``exit_fn`` does, in tests)."""
        if not self._failing.acquire(blocking=False):
            self._stop.wait()  # the other thread is already stopping the process
            return
        op = self.current() or "a collective"
        waited = time.monotonic() - self._ops[-1][2] if self._ops else 0.0
        where = f"{op} at step {self.step}"
        self._failed = f"in {where}"
        try:
            self._publish()
            first = self._read_all()
            time.sleep(self.window)
            second = self._read_all()
            reports = assess_peers(self.rank, self.world, self.step, self.seq, first, second)
        except Exception as err:  # the store is gone: its host (rank 0, or the agent) stopped
            reports = [
                PeerReport(
                    0,
                    True,
                    f"the rendezvous store does not answer ({type(err).__name__}), so rank 0, which "
                    "hosts it unless torchrun does, has most likely stopped",
                )
            ]
        missing = [r.rank for r in reports if r.missing]
        if missing:
            head = f"{_ranks(missing)} of {self.world} stopped answering during {where}"
        else:
            head = f"{op} failed at step {self.step} with no rank missing (a network fault?)"
        lines = [
            f"dynamoe: collective failure: {head}; rank {self.rank} waited {waited:.1f} s in it "
            f"(parallel.collective_timeout_s={self.timeout_s:g}) and stops with exit code {EXIT_CODE} so that "
            "`moe launch` (launch.max_failures > 0) restarts the job from its last committed checkpoint "
            "(elsewhere: rerun with --resume)",
            f"  the error here: {cause}",
            *(f"  {r.text}" for r in reports),
        ]
        self._finish(lines, head)

    def _finish(self, lines: list[str], summary: str) -> None:
        stream = self._stream or sys.stderr
        print("\n".join(lines), file=stream, flush=True)
        try:
            self.store.set(f"{KEY_PREFIX}/failed", f"rank {self.rank}: {summary}")
        except Exception:
            pass  # the store is gone: the other ranks find out from their own collectives
        if self._linger:
            time.sleep(self.window)
        sys.stdout.flush()
        self._stop.set()
        self._exit_fn(EXIT_CODE)

    def follow(self, reported: str) -> None:
        """Another rank stopped the job: stop this rank too (it may be stalled outside any
        collective, where nothing else would ever stop it)."""
        if not self._failing.acquire(blocking=False):
            return
        where = f"in {self.current()}" if self._ops else "outside any collective"
        self._failed = f"stopping on the report of {reported.partition(':')[0]}"
        try:
            self._publish()
        except Exception:
            pass  # the store is gone; nobody is left to read it
        lines = [
            f"dynamoe: collective failure reported by {reported}; rank {self.rank} of {self.world} was at step "
            f"{self.step}, {where}, and stops too with exit code {EXIT_CODE}"
        ]
        self._finish(lines, f"followed {reported}")

    def stop(self) -> None:
        """Stop the heartbeat thread and wait for it (its store calls give up within seconds)."""
        if self._thread is not None:
            _join_heartbeat(self._stop, self._thread)


def _join_heartbeat(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=15.0)  # longer than one store call's own timeout (10 s)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _watch(ref, stop: threading.Event) -> None:
    """The heartbeat thread: beat, and fail a collective overdue past its timeout. It holds the
    watchdog weakly, so a trainer that is dropped takes its thread with it."""
    while not stop.is_set():
        watchdog = ref()
        if watchdog is None:
            return
        period = watchdog.period
        try:
            watchdog._publish()
            reported = watchdog.peer_failure()
        except Exception:
            reported = None  # the store is unreachable; the collectives themselves will tell
        overdue = watchdog.overdue()
        if overdue is not None:
            watchdog.fail(
                f"still inside {overdue} {watchdog.timeout_s + watchdog.grace:.0f} s after it began; the "
                "collective itself never gave up"
            )
        elif reported is not None:
            watchdog.follow(reported)
        del watchdog
        stop.wait(min(period, 1.0))


def heartbeat_store():
    """A client of the default process group's store of its own, so that heartbeats never queue
    behind the main thread's store calls (and fail within seconds once the store is gone)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    store = c10d._get_default_store()
    inner = store
    while hasattr(inner, "underlying_store"):
        inner = inner.underlying_store
    if isinstance(inner, dist.TCPStore):
        client = dist.TCPStore(
            inner.host, inner.port, is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False
        )
        return dist.PrefixStore(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", client)
    return store


def start_watchdog(timeout_s: float) -> CollectiveWatchdog:
    """The watchdog of this process, on the default group (one process: a no-op one)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    return CollectiveWatchdog(rank, world, timeout_s, heartbeat_store() if world > 1 else None)
