"""The embedded Triton as the tests' replicas run it (under the drain supervisor, embedded/drain.py)
refuses the APIs nobody uses on both protocols, even to a client that sends the closing
restriction's own header, and keeps open what the gateway and the benchmarks use. The single
Triton of `make serve`, with no drain and no model-repository API at all:
tests/embedded/test_stack.py. The container entrypoint's Triton: tests/deploy/test_triton_image.py."""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

import pytest
import tritonclient.grpc as grpcclient

from embedded.drain import CLOSED_HEADER, CLOSED_VALUE
from embedded.triton import TritonServer
from tests.embedded.triton_api import (
    REFUSED_GRPC,
    REFUSED_HTTP,
    REGISTER_BODY,
    REGISTER_PATH,
    closed_grpc_header,
    grpc_refusal,
    http_status,
    raw_grpc_frames,
    raw_http1_register,
    register_over_grpc,
)


def test_registering_system_shared_memory_is_refused_on_http(triton: TritonServer) -> None:
    url = triton.http_url + REGISTER_PATH
    assert http_status(url, body=REGISTER_BODY) == REFUSED_HTTP
    # The restriction's own header, as close as an HTTP client gets to sending it ...
    assert http_status(url, body=REGISTER_BODY, headers={"Closed": f"To-Everyone:{CLOSED_VALUE}"}) \
        == REFUSED_HTTP
    # ... and its exact text on the wire: the parser ends the name at the first colon.
    host, port = urlsplit(triton.http_url).hostname, urlsplit(triton.http_url).port
    assert host and port
    assert raw_http1_register(host, port) == REFUSED_HTTP
    assert http_status(f"{triton.http_url}/v2/systemsharedmemory/status", "GET") == REFUSED_HTTP
    assert http_status(f"{triton.http_url}/v2/cudasharedmemory/status", "GET") == REFUSED_HTTP


def test_registering_system_shared_memory_is_refused_on_grpc(triton: TritonServer) -> None:
    assert register_over_grpc(triton.grpc_url) == REFUSED_GRPC
    host, port = triton.grpc_url.rsplit(":", 1)
    # Without the header, Triton itself answers (its restriction refuses the call) ...
    assert raw_grpc_frames(host, int(port), [])[:1] == ["HEADERS"]
    # ... with it, gRPC's own parser resets the stream before Triton sees the call.
    answer = raw_grpc_frames(host, int(port), [closed_grpc_header()])
    assert answer and "HEADERS" not in answer, answer
    # A gRPC library will not even send it.
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        name, value = closed_grpc_header()
        assert grpc_refusal(lambda: client.get_system_shared_memory_status(headers={name: value}))


@pytest.mark.parametrize("path", ["/v2/trace/setting", "/v2/logging"])
def test_trace_and_logging_are_refused_on_http(triton: TritonServer, path: str) -> None:
    assert http_status(triton.http_url + path, "GET") == REFUSED_HTTP
    assert http_status(triton.http_url + path, body=b'{"log_verbose_level": 1}') == REFUSED_HTTP


def test_trace_logging_and_the_repository_are_refused_on_grpc(triton: TritonServer) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        refused = {
            "trace": grpc_refusal(lambda: client.update_trace_settings(settings={"trace_rate": "1"})),
            "logging": grpc_refusal(lambda: client.update_log_settings({"log_verbose_level": 1})),
            "index": grpc_refusal(client.get_model_repository_index),
            "load": grpc_refusal(lambda: client.load_model("nsfw")),
            "unload": grpc_refusal(lambda: client.unload_model("txt2img")),
        }
        assert refused == dict.fromkeys(refused, REFUSED_GRPC)
        assert client.is_model_ready("txt2img")  # nothing was unloaded


def test_what_the_gateway_and_the_benchmarks_use_stays_open(triton: TritonServer) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().version
        assert client.get_model_config("txt2img").config.platform == "ensemble"
        # Statistics: read-only, the counters the metrics port publishes to the same peers.
        assert client.get_inference_statistics("nsfw").model_stats
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/stats", timeout=10) as resp:
        assert json.loads(resp.read())["model_stats"]


def test_the_closed_header_is_not_a_header_anyone_can_send() -> None:
    # What the raw tests above rely on: a colon inside the name, upper case for gRPC.
    assert ":" in CLOSED_HEADER and CLOSED_HEADER != CLOSED_HEADER.lower()
    assert CLOSED_VALUE != CLOSED_VALUE.strip()
