"""Third-party chatter turned down while the exporters run.

What the libraries print during an export is harmless but reads like trouble to a newcomer:
transformers' "requires torchvision; falling back" and config notices, tqdm bars for a 1-shard
save, NNCF's progress bar, onnxruntime's quantizer narrating every node. Real warnings of our own
(the export.* loggers) and errors still show.
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
    """transformers' and huggingface_hub's notices and progress bars off, restored after."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            hub.enable_progress_bars()


@contextmanager
def no_console_output() -> Iterator[None]:
    """For NNCF, whose rich progress bar goes to stdout with no switch to turn it off."""
    with redirect_stdout(io.StringIO()):
        yield
