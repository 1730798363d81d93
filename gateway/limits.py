"""What /generate accepts: the gateway's own limits, tightened by the generation model's.

The diffusion model checks sizes, steps and guidance itself (its config.pbtxt `parameters`).
The gateway reads those limits from Triton and validates with whichever is tighter, its setting
or the model's, so a client is never promised more than the model takes: a larger
`GATEWAY_MAX_STEPS` cannot turn into a confusing "model refused" 400 while the OpenAPI document
advertises the larger value. Adopting rather than refusing readiness keeps a fleet of gateways
serving through a model rollout that lowers a limit; a warning names both values. The settings
stay useful as a stricter cap (say, fewer steps for public clients than the model allows).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.settings import PREFIX, Settings
from gateway.triton.contract import ModelLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationLimits:
    min_size: int
    max_size: int
    max_pixels: int
    max_steps: int
    max_guidance_scale: float
    max_prompt_chars: int
    # Settings that the model's tighter limits overrode, each naming both values.
    adopted: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationLimits:
        return cls(
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_pixels=settings.max_pixels,
            max_steps=settings.max_steps,
            max_guidance_scale=settings.max_guidance_scale,
            max_prompt_chars=settings.max_prompt_chars,
        )

    def within(self, model: ModelLimits) -> GenerationLimits:
        """These limits tightened by the model's, noting every setting the model overrode."""
        changes: dict[str, float] = {}
        notes: list[str] = []
        for name, (setting, tightest) in _FROM_MODEL.items():
            ours, theirs = getattr(self, name), getattr(model, name)
            if theirs is not None and tightest(ours, theirs) != ours:
                changes[name] = theirs
                notes.append(f"{PREFIX}{setting} is {ours:g}, the model's {name} is {theirs:g}")
        return replace(self, **changes, adopted=tuple(notes))  # type: ignore[arg-type]

    @property
    def conflict(self) -> str | None:
        """Why no request at all could pass these limits, or None."""
        if self.min_size > self.max_size:
            return f"the smallest size allowed ({self.min_size}) is above the largest ({self.max_size})"
        if self.min_size * self.min_size > self.max_pixels:
            return f"{PREFIX}MAX_PIXELS ({self.max_pixels}) is below the smallest image allowed"
        return None


# The limits the model declares: the setting each one tightens, and which of two values is tighter.
_FROM_MODEL: dict[str, tuple[str, Callable[[float, float], float]]] = {
    "min_size": ("MIN_SIZE", max),
    "max_size": ("MAX_SIZE", min),
    "max_steps": ("MAX_STEPS", min),
    "max_guidance_scale": ("MAX_GUIDANCE_SCALE", min),
}


class LimitsSource:
    """The current limits of one process: the settings until the model's have been read, then
    both, read again every `refresh_s` (every `retry_s` while Triton cannot answer)."""

    def __init__(
        self,
        settings: Settings,
        read_model: Callable[[], ModelLimits],
        *,
        refresh_s: float = 30.0,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._own = GenerationLimits.from_settings(settings)
        self._read_model = read_model
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._limits = self._own
        self._next_read = 0.0
        self.problem: str | None = None

    def current(self) -> GenerationLimits:
        """The limits to validate with now; reads the model's when due, never raises, and never
        makes a request wait behind another thread's read."""
        if self._clock() >= self._next_read and self._lock.acquire(blocking=False):
            try:
                self._read()
            finally:
                self._lock.release()
        return self._limits

    def refresh(self) -> GenerationLimits:
        """Read the model's limits now (readiness probes); the problem, if any, in `problem`."""
        with self._lock:
            self._read()
        return self._limits

    def _read(self) -> None:
        try:
            model = self._read_model()
        except Exception as exc:  # noqa: BLE001 - Triton down, a bad config: keep the last limits
            self.problem = f"cannot read the generation model's limits: {exc}"
            self._next_read = self._clock() + self._retry_s
            return
        limits = self._own.within(model)
        if limits.adopted != self._limits.adopted:
            for note in limits.adopted:
                log.warning("validating with the model's tighter limit: %s", note)
        self._limits = limits
        self.problem = None
        self._next_read = self._clock() + self._refresh_s
