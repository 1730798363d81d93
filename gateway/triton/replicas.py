"""The Triton replicas behind GATEWAY_TRITON_URL: found again every GATEWAY_TRITON_REFRESH_S,
one gRPC client each, and which one takes the next call.

Why not one gRPC channel with the `round_robin` policy over a `dns:///` target, as before: gRPC
resolves the name again only when a connection breaks (its resolver has no timer, and it rate-
limits re-resolution), so a replica added behind the name got no call from a running gateway
(checked here: a `round_robin` channel on a name served by a loopback DNS server, a second
address added, 0 of 185 calls reached it in 90 s, and the server was asked only at the start).
Making connections break on purpose (Triton's `--grpc-max-connection-age`) would be a server
setting for a client concern and still would not say which replica a call went to. So:

- A refresher thread resolves the target every `refresh_s` seconds and rebuilds the set: a new
  address gets a client of its own and takes calls once Triton says it is ready; an address
  gone from the name takes no new call, and its client is closed once its calls have finished.
  A resolver that cannot answer (timeout, server failure) leaves the set as it was; a name that
  has no address (NXDOMAIN, no records) empties it.
- The same pass asks each replica whether it is ready. A draining replica (embedded/drain.py)
  turns not ready at once, so it gets no new call while it finishes the ones it holds.
- Each call goes to the ready replica with the fewest calls in flight from this process, taking
  turns among equals; the caller gets the replica, so a retry can go to *another* one and
  calls are counted per address.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.metrics import NULL_METRICS, Recorder
from gateway.triton.target import Endpoint, ResolutionError, Target
from gateway.vocabulary import ReplicaState

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIN_REFRESH_GAP_S = 1.0


class Replica:
    """One address of the target with its own gRPC client. Mutable fields are guarded by the
    set's lock."""

    def __init__(self, endpoint: Endpoint, channel_args: Sequence[tuple[str, Any]]) -> None:
        self.endpoint = endpoint
        # The channel connects lazily: a replica that is down costs nothing until asked.
        self.client = grpcclient.InferenceServerClient(
            endpoint.grpc_target, channel_args=list(channel_args)
        )
        self.ready: bool | None = None  # None: not asked yet
        self.in_flight = 0
        self.retired = False  # gone from the target: no new call, closed once idle

    @property
    def address(self) -> str:
        return self.endpoint.label

    @property
    def state(self) -> ReplicaState:
        return ReplicaState.READY if self.ready else ReplicaState.NOT_READY

    def __repr__(self) -> str:
        return f"Replica({self.address}, ready={self.ready}, in_flight={self.in_flight})"


class NoReplica(LookupError):
    """No replica can take the call."""


class ReplicaSet:
    def __init__(
        self,
        target: Target,
        *,
        refresh_s: float,
        probe_timeout_s: float,
        channel_args: Sequence[tuple[str, Any]],
        metrics: Recorder = NULL_METRICS,
    ) -> None:
        self.target = target
        self.refresh_s = refresh_s
        self.probe_timeout_s = probe_timeout_s
        self.channel_args = tuple(channel_args)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._replicas: dict[Endpoint, Replica] = {}
        self._retiring: list[Replica] = []
        self._turn = 0
        self.problem: str | None = None  # why the last resolution failed, if it did
        self._started = False
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve and probe once, then keep doing it in the background. Started on first use,
        so the thread lives in the process that serves (a gunicorn worker), never in one that
        forks afterwards."""
        if self._started:
            return
        with self._start_lock:  # the first calls wait for the first resolution
            if self._started:
                return
            self._pool = ThreadPoolExecutor(8, thread_name_prefix="triton-probe")
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="triton-replicas", daemon=True)
            self._thread.start()
            self._started = True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.probe_timeout_s * 2 + 1)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            replicas = [*self._replicas.values(), *self._retiring]
            self._replicas.clear()
            self._retiring.clear()
        for replica in replicas:
            replica.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # the refresher must outlive any one failure
                log.exception("refreshing the Triton replicas failed")
            # Failed calls wake the refresher; a burst of them (every call failing while a
            # replica is down) must not turn it into a loop of lookups and probes.
            rest = min(_MIN_REFRESH_GAP_S, self.refresh_s) - (time.monotonic() - started)
            if rest > 0 and self._stop.wait(rest):
                return

    def wake(self) -> None:
        """Refresh now rather than at the next interval (a replica just failed a call)."""
        self._wake.set()

    # -- discovery -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Resolve the target, rebuild the set, ask every replica whether it is ready."""
        try:
            endpoints = self.target.resolve(self.probe_timeout_s)
        except ResolutionError as exc:
            if self.problem != str(exc):
                log.warning("%s; keeping the %d known replicas", exc, len(self._replicas))
            self.problem = str(exc)
        else:
            self.problem = None if endpoints else "the Triton target has no address"
            self._rebuild(endpoints)
        self.map(self._probe_ready, self._current())
        self._report()

    def _rebuild(self, endpoints: Iterable[Endpoint]) -> None:
        wanted = set(endpoints)
        closing = []
        with self._lock:
            added = [e for e in wanted if e not in self._replicas]
            for endpoint in added:
                self._replicas[endpoint] = Replica(endpoint, self.channel_args)
            removed = [r for e, r in self._replicas.items() if e not in wanted]
            for replica in removed:
                del self._replicas[replica.endpoint]
                replica.retired = True
                self._retiring.append(replica)
            closing = self._idle_retired()
        for endpoint in sorted(added):
            log.info("Triton replica added: %s", endpoint.label)
        for replica in removed:
            log.info("Triton replica removed: %s (%d calls in flight)", replica.address, replica.in_flight)
        self._close(closing)

    def _idle_retired(self) -> list[Replica]:
        """Retired replicas with no call left, taken out of the list (under the lock)."""
        idle = [r for r in self._retiring if r.in_flight == 0]
        self._retiring = [r for r in self._retiring if r.in_flight > 0]
        return idle

    def _close(self, replicas: list[Replica]) -> None:
        for replica in replicas:
            replica.client.close()
            self.metrics.forget_triton_address(replica.address)

    def _probe_ready(self, replica: Replica) -> None:
        try:
            ready = bool(replica.client.is_server_ready(client_timeout=self.probe_timeout_s))
        except (InferenceServerException, ValueError):  # ValueError: closed, gone from the name
            ready = False
        self.set_ready(replica, ready)

    def set_ready(self, replica: Replica, ready: bool) -> None:
        with self._lock:
            changed = replica.ready is not None and replica.ready != ready
            replica.ready = ready
        if changed:
            log.info("Triton replica %s is %s", replica.address, "ready" if ready else "not ready")

    def _report(self) -> None:
        self.metrics.triton_addresses_found(r.state for r in self._current())

    # -- selection -------------------------------------------------------------------------

    def replicas(self) -> list[Replica]:
        """The replicas of the target now (not the retired ones), in address order."""
        self.start()
        return self._current()

    def _current(self) -> list[Replica]:
        with self._lock:
            return [self._replicas[e] for e in sorted(self._replicas)]

    def acquire(self, exclude: Iterable[Replica] = (), *, ready_only: bool = False) -> Replica:
        """The replica the next call goes to, its in-flight count taken; `release` it after.

        The ready ones with the fewest calls in flight, in turns. When none is ready (Triton
        still loading, or every probe failed) a first call goes to any of them all the same, to
        be answered honestly; `ready_only` (a retry) goes nowhere then: NoReplica."""
        self.start()
        skip = {r.endpoint for r in exclude}
        with self._lock:
            pool = [self._replicas[e] for e in sorted(self._replicas) if e not in skip]
            candidates = [r for r in pool if r.ready] or ([] if ready_only else pool)
            if not candidates:
                raise NoReplica(self.problem or "no Triton replica is ready")
            fewest = min(r.in_flight for r in candidates)
            tied = [r for r in candidates if r.in_flight == fewest]
            replica = tied[self._turn % len(tied)]
            self._turn += 1
            replica.in_flight += 1
            return replica

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1
            closing = self._idle_retired() if replica.retired else []
        self._close(closing)

    def not_serving(self, replica: Replica) -> None:
        """A call found the replica unreachable or stopping: no new call until a probe finds it
        ready again, and a refresh now (it may have left the name)."""
        self.set_ready(replica, False)
        self.wake()

    # -- helpers ---------------------------------------------------------------------------

    def map(self, fn: Callable[[Replica], T], replicas: list[Replica]) -> list[T]:
        """`fn` over the replicas at once (probes: a replica that does not answer costs its
        timeout once, not once per replica)."""
        if len(replicas) <= 1 or self._pool is None:
            return [fn(r) for r in replicas]
        return list(self._pool.map(fn, replicas))
