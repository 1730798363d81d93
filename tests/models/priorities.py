"""Where a request lands among queued batch work in the diffusion model, seen on the session's real
Triton with the model held (tests/models/helpers.py, `diffusion_held`), for the model tests and
the gateway client's.

A full pass of batch work (`max_batch_size` requests at Triton's BATCH level) waits behind a held
pass, then the request under test. On release, one instance takes the next pass from the queue:

- a request that goes ahead (INTERACTIVE) runs in that pass with all but the last of the batch
  work, which waits for the pass after; that last one holds its own pass (it carries the test
  hook), so the state "the request and the others answered, the last held" stays put;
- a request that does not (BATCH, or none named) waits for the pass after the batch work, and it
  holds that pass itself: "every batch request answered, the request held" stays put.

Each end state lasts until the test cancels the holder, and the other order can never reach it:
nothing depends on how fast the machine runs the passes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2

from embedded.triton import TritonServer
from gateway.triton.contract import TIMEOUT_MS, Priority
from tests.models.helpers import (
    DIFFUSION,
    HOLD,
    HOLD_LIMIT_MS,
    diffusion_held,
    diffusion_interrupted,
    diffusion_pending,
    diffusion_steps,
    generation,
    model_config,
    tensors,
    wait_until,
)

log = logging.getLogger(__name__)

# Every request here has this many steps (and 64x64, default guidance), so they share passes;
# more than one, or the test hook cannot hold a pass.
STEPS = 2
# One full pass of batch work waits ahead of the request under test.
BATCH_AHEAD = model_config(DIFFUSION).max_batch_size
HOLD_PARAMETERS = {HOLD: True, TIMEOUT_MS: HOLD_LIMIT_MS}
# In full-suite runs, after other tests had cancelled calls on the session's Triton, one queued
# batch request (the second of eight, in both variants that failed) came back with an error
# though nothing had ended it; never in a run of these tests alone. Triton 2.51's gRPC frontend
# has corner cases where a cancellation meets a call state being reused (some fixed after 24.10,
# triton-inference-server/server#7840), the likely cause. One lost request shifts every pass by
# one, the holder joins the first, and the scene can no longer tell anything; it cannot hide a
# wrong order, where nothing is answered at all. Such a scene is set again, at most this many
# times in all, each one logged.
SCENE_ATTEMPTS = 3
# Sends the request under test, reporting to the Answer it is given; returns the call when it is
# one the test can cancel (a direct one), else None.
Send = Callable[["Answer"], "Cancellable | None"]


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


def queue_policy(level: Priority) -> model_config_pb2.ModelQueuePolicy:
    """The queue policy the real config.pbtxt gives one priority level."""
    policies = model_config(DIFFUSION).dynamic_batching.priority_queue_policy
    assert level in policies, f"the diffusion model has no queue policy for level {level}"
    return policies[level]


@dataclass
class Answer:
    """A gRPC callback that records its answer; also for a call the test makes in a thread."""

    done: threading.Event = field(default_factory=threading.Event)
    error: object = None

    def __call__(self, result: Any, error: object) -> None:
        self.error = error
        self.done.set()

    def ok(self) -> bool:
        return self.done.is_set() and self.error is None


@dataclass
class Scene:
    triton: TritonServer
    request: Answer  # the request under test
    batch: list[Answer]  # the batch work queued before it, in order
    steps: float  # the model's step counter before the hold was released

    def describe(self) -> str:
        """Where things stand, for a failure's message."""
        answered = "".join("+" if a.ok() else ("x" if a.done.is_set() else ".") for a in self.batch)
        errors = {str(a.error) for a in self.batch if a.error is not None}
        return (
            f"steps {diffusion_steps(self.triton) - self.steps:g} since the release "
            f"(a full pass and a held step: {BATCH_AHEAD * STEPS + 1}), "
            f"{diffusion_pending(self.triton):g} pending, request "
            f"{'answered' if self.request.done.is_set() else 'waiting'} ({self.request.error}), "
            f"batch work answered [{answered}] {sorted(errors)}"
        )

    def spoiled(self) -> bool:
        """Triton ended a batch request that nobody ended (see SCENE_ATTEMPTS)."""
        return any(a.done.is_set() and a.error is not None for a in self.batch[:-1])

    def next_pass_held(self) -> bool:
        """A full pass ran since the release, and the pass after holds at its first step."""
        return diffusion_steps(self.triton) >= self.steps + BATCH_AHEAD * STEPS + 1


@contextmanager
def behind_batch_work(triton: TritonServer, send: Send, *, holds_itself: bool) -> Iterator[Scene]:
    """A full pass of batch work queued behind a held pass, then `send`'s request (which reports
    to the Answer it is given, and returns its call when the test may cancel it); the hold
    released. The last batch request holds its pass, or, with `holds_itself`, the request sent
    does (a direct call that carries HOLD_PARAMETERS). Yields once the hold is released; cancels
    what is left after, and waits for the holder to stop."""
    batch = [Answer() for _ in range(BATCH_AHEAD)]
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        calls = []
        try:
            with diffusion_held(triton):
                # Counted while the held pass stands still.
                steps = diffusion_steps(triton)
                for i, answer in enumerate(batch):
                    last = i == BATCH_AHEAD - 1
                    calls.append(client.async_infer(
                        DIFFUSION, tensors(**generation(steps=STEPS, seed=100 + i, scale=None)),
                        callback=answer, priority=int(Priority.BATCH),
                        parameters=HOLD_PARAMETERS if last and not holds_itself else None,
                    ))
                wait_until(lambda: diffusion_pending(triton) == BATCH_AHEAD,
                           "the batch work waits in the queue")
                request = Answer()
                call = send(request)
                holder = call if holds_itself else calls[-1]
                if call is not None:
                    calls.append(call)
                wait_until(lambda: diffusion_pending(triton) == BATCH_AHEAD + 1,
                           "the request waits behind the batch work")
            yield Scene(triton, request, batch, steps)
            cancelled = diffusion_interrupted(triton, "cancelled")
            assert holder is not None, "a request that holds itself is one the test can cancel"
            holder.cancel()
            wait_until(lambda: diffusion_interrupted(triton, "cancelled") > cancelled,
                       "the model stopped the holder")
        finally:
            for call in calls:
                call.cancel()


def ran_ahead(triton: TritonServer, send: Send) -> None:
    """Asserts that `send`'s request runs in the first pass after the hold, ahead of batch work
    queued before it: answered with all but the last batch request while that one holds the
    pass after, nothing else queued. (Were it behind, the last batch request would hold the
    first pass and nothing would be answered: the wait would run out.)"""

    def check(scene: Scene) -> None:
        request, batch = scene.request, scene.batch
        assert request.error is None, request.error
        assert [a.ok() for a in batch] == [True] * (BATCH_AHEAD - 1) + [False]
        assert diffusion_pending(triton) == 0

    _scene(
        triton, send, holds_itself=False,
        reached=lambda scene: scene.next_pass_held() and scene.request.done.is_set()
        and all(a.done.is_set() for a in scene.batch[:-1]),
        what="the request ran in the first pass, ahead of the last batch request queued before it",
        check=check,
    )


def waited_behind(triton: TritonServer, send: Send) -> None:
    """Asserts that `send`'s request (holding its own pass) waits for the batch work queued
    before it: every batch request answered while the request holds the pass after. (Were it
    ahead, it would hold the first pass and no batch request would be answered.)"""

    def check(scene: Scene) -> None:
        assert [a.ok() for a in scene.batch] == [True] * BATCH_AHEAD
        assert not scene.request.done.is_set(), scene.request.error
        assert diffusion_pending(triton) == 0

    _scene(
        triton, send, holds_itself=True,
        reached=lambda scene: scene.next_pass_held() and all(a.done.is_set() for a in scene.batch),
        what="the batch work queued before the request ran in the first pass",
        check=check,
    )


def _scene(
    triton: TritonServer,
    send: Send,
    *,
    holds_itself: bool,
    reached: Callable[[Scene], bool],
    what: str,
    check: Callable[[Scene], None],
) -> None:
    """Sets the scene, waits until it `reached` its end state, then `check`s it; a scene Triton
    spoiled is set again (SCENE_ATTEMPTS)."""
    for attempt in range(1, SCENE_ATTEMPTS + 1):
        with behind_batch_work(triton, send, holds_itself=holds_itself) as scene:
            try:
                wait_until(lambda: reached(scene) or scene.spoiled(), what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; {scene.describe()}") from None
            if scene.spoiled() and attempt < SCENE_ATTEMPTS:
                log.warning("priority scene spoiled by Triton, set again: %s", scene.describe())
                # The holder must reach the model, which alone counts its cancel.
                wait_until(lambda: diffusion_pending(triton) == 0, "the queue emptied")
                continue
            assert not scene.spoiled(), f"Triton spoiled every scene; {scene.describe()}"
            check(scene)
            return
