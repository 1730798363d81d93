"""schemathesis against /openapi.json of the running app: the real Triton, the local S3, API keys
on. Every generated request, valid or not, must get a documented status and a body that matches
the schema, and no server error other than the documented upstream ones (502/503/504).

A bounded run here; the long one (docs/security.md, "Fuzzing"):
    FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/gateway/test_views/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway import Settings
from tests.gateway.conftest import LocalS3

KEY = "fuzz-key-" + "0123456789abcdef"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
UPSTREAM_STATUSES = {502, 503, 504}  # documented: Triton or storage failed, not the gateway


@schemathesis.check
def no_unexpected_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code >= 500 and response.status_code not in UPSTREAM_STATUSES:
        raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")
    return None


@pytest.fixture
def fuzz_schema(make_app: Any, triton_settings: Settings, s3: LocalS3, redis_url: str) -> Any:
    # Small limits keep every request the schema calls valid cheap to generate (64-128 px, 2 steps).
    # With a store: Idempotency-Key and the /jobs endpoints are fuzzed for real, not 503.
    app = make_app(
        triton_settings.replace(
            redis_url=redis_url,
            api_keys=(KEY,),
            max_size=128,
            max_pixels=128 * 128,
            max_steps=2,
            max_prompt_chars=300,
        )
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # A body over GATEWAY_MAX_BODY_BYTES (a huge invalid s3_prefix, say) is refused with the
    # documented 413 before it is read as JSON: a rejection too.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def fuzz(strategy: st.SearchStrategy[Any], examples: int, statuses: Counter[int]) -> None:
    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a failure in CI reproduces locally
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any) -> None:
        response = case.call_and_validate(
            headers={"Authorization": f"Bearer {KEY}"},
            additional_checks=[no_unexpected_server_error],
            # 5xx in general is judged by the check above; and "valid by the schema" cannot say
            # that s3_prefix must name an allowed host, so schema-valid bodies may rightly be 400.
            excluded_checks=[not_a_server_error, positive_data_acceptance],
        )
        statuses[response.status_code] += 1

    one()


def test_every_operation_conforms_to_the_schema(fuzz_schema: Any) -> None:
    statuses: Counter[int] = Counter()
    fuzz(fuzz_schema.as_strategy(GenerationMode.POSITIVE), max(20, EXAMPLES // 10), statuses)
    assert statuses[200] > 0


def test_generate_conforms_to_the_schema_valid_or_not(fuzz_schema: Any, s3: LocalS3) -> None:
    upload_url = s3.presign_put("fuzz/1.png")

    def reachable(case: Any) -> Any:
        """A valid case made to reach Triton and storage: the spec's defaults (512×1024, 15 steps)
        are past this app's small limits, so absent sizes and steps get small values, and an
        upload goes to the local S3. The rest of the case stays as generated."""
        body = case.body
        if isinstance(body, dict):
            for name, small in (("width", 64), ("height", 64), ("num_inference_steps", 1)):
                if body.get(name) is None:
                    body[name] = small
            if body.get("response_format") in (None, "s3"):
                body["s3_prefix"] = upload_url
        # Generated keys repeat ("0", "0", ...): each reachable case gets its own, so it runs
        # rather than meeting an earlier case's key (422, or the earlier answer replayed).
        if case.headers and "Idempotency-Key" in case.headers:
            case.headers["Idempotency-Key"] = uuid.uuid4().hex
        return case

    generate = fuzz_schema["/generate"]["POST"]
    positive = generate.as_strategy(GenerationMode.POSITIVE)
    statuses: Counter[int] = Counter()
    fuzz(st.one_of(positive, positive.map(reachable)), EXAMPLES // 2, statuses)
    fuzz(generate.as_strategy(GenerationMode.NEGATIVE), EXAMPLES // 2, statuses)
    print(f"/generate statuses over {sum(statuses.values())} cases: {dict(sorted(statuses.items()))}")
    # Both sides were reached: images were generated (and uploaded), and requests were refused.
    assert statuses[200] > 0 and statuses[400] > 0
    assert not {s for s in statuses if s >= 500} - UPSTREAM_STATUSES
    stored = s3.keys()  # some valid cases were uploaded
    assert any(key.startswith("fuzz/") and key.endswith(".jpg") for key in stored)
