"""Third-party chatter turned down while the exporters and benchmarks run.

What the libraries print while building models is harmless but reads like trouble to a
newcomer: transformers' "requires torchvision; falling back" and config notices, diffusers'
dtype notices, tqdm bars for a 1-shard save, NNCF's progress bar, onnxruntime's quantizer
narrating every node. Our own log lines (the export.* loggers) and errors still show.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantization and optimizer narrate every node on the root logger, and its
    quantizer suggests a pre-processing step that export.nsfw's fusion already does."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers', diffusers' and huggingface_hub's notices and progress bars off, restored
    after."""
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (transformers_logging, diffusers_logging)]
    hub_bars_off = hub.are_progress_bars_disabled()
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
        if not hub_bars_off:
            hub.enable_progress_bars()


@contextmanager
def no_console_output() -> Iterator[None]:
    """For NNCF, whose rich progress bar goes to stdout with no switch to turn it off."""
    with redirect_stdout(io.StringIO()):
        yield
