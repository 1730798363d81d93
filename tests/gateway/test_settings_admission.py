"""The gateway's default admission against the diffusion model's batching, read from their real
sources: one gateway process with the default settings admits at least one full batch of the
diffusion model (its config.pbtxt's max_batch_size), and gunicorn keeps SPARE_THREADS threads
beyond that bound (what `threads_problem` enforces at start)."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedded.triton import DEFAULT_REPOSITORY
from gateway.settings import SPARE_THREADS, Settings


def diffusion_max_batch_size() -> int:
    text = (DEFAULT_REPOSITORY / "diffusion" / "config.pbtxt").read_text()
    return int(text_format.Parse(text, model_config_pb2.ModelConfig()).max_batch_size)


def test_one_default_gateway_process_admits_a_full_batch() -> None:
    settings = Settings.from_env({})  # the defaults, read as the gateway reads them
    # Fewer would leave every batch short however many clients wait: the 9th..nth client gets
    # 429 while the model runs passes of 6.
    assert settings.max_in_flight >= diffusion_max_batch_size()


def test_the_default_threads_leave_the_spare_ones_beyond_the_bound() -> None:
    settings = Settings.from_env({})
    assert settings.threads >= settings.max_in_flight + SPARE_THREADS
    assert settings.threads_problem() is None
