from __future__ import annotations

import base64
import dataclasses

import pytest

from gateway.settings import Settings, SettingsError, settings_table


def test_defaults_match_the_issue() -> None:
    s = Settings.from_env({})
    assert s.triton_url == "127.0.0.1:8001"
    assert s.triton_metrics_url == "http://127.0.0.1:8002/metrics"
    assert s.upload_backoff == (1.0, 2.0, 4.0)
    assert s.upload_attempts == 4
    assert s.upload_naming == "rewrite"
    assert s.upload_headers == ()
    assert s.upload_allowed_hosts == ()
    assert s.jpeg_quality == 90
    assert (s.min_size, s.max_size, s.max_steps) == (64, 2048, 100)
    assert (s.host, s.port) == ("127.0.0.1", 8080)


def test_values_are_parsed_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "GATEWAY_TRITON_URL": "triton:9001",
            "GATEWAY_TRITON_DEADLINE_S": "30.5",
            "GATEWAY_UPLOAD_BACKOFF": "0.5, 1,2",
            "GATEWAY_UPLOAD_ALLOWED_HOSTS": "HTTP://127.0.0.1:9000, *.Sekai.chat ,[::1]:9000",
            "GATEWAY_UPLOAD_HEADERS": "Content-Type: image/jpeg; x-amz-acl: public-read",
            "GATEWAY_UPLOAD_NAMING": "KEEP",
            "GATEWAY_JPEG_QUALITY": "75",
            "GATEWAY_WORKERS": "3",
            "GATEWAY_LOG_LEVEL": "debug",
        }
    )
    assert s.triton_url == "triton:9001"
    assert s.triton_deadline_s == 30.5
    assert s.upload_backoff == (0.5, 1.0, 2.0)
    assert s.upload_allowed_hosts == ("http://127.0.0.1:9000", "*.sekai.chat", "[::1]:9000")
    assert s.upload_headers == (("Content-Type", "image/jpeg"), ("x-amz-acl", "public-read"))
    assert s.upload_naming == "keep"
    assert (s.jpeg_quality, s.workers, s.log_level) == (75, 3, "DEBUG")


def test_empty_backoff_means_a_single_attempt() -> None:
    assert Settings.from_env({"GATEWAY_UPLOAD_BACKOFF": ""}).upload_attempts == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_JPEG_QUALITY", "0"),
        ("GATEWAY_JPEG_QUALITY", "high"),
        ("GATEWAY_UPLOAD_BACKOFF", "1,two,4"),
        ("GATEWAY_UPLOAD_BACKOFF", "-1"),
        ("GATEWAY_UPLOAD_NAMING", "rename"),
        ("GATEWAY_UPLOAD_ALLOWED_HOSTS", "ftp://example.com"),
        ("GATEWAY_UPLOAD_ALLOWED_HOSTS", "http://example.com/path"),
        ("GATEWAY_API_KEYS", "short"),
        ("GATEWAY_API_KEYS", "a key with spaces in it"),
        ("GATEWAY_MAX_IN_FLIGHT", "0"),
        ("GATEWAY_SHUTDOWN_TIMEOUT_S", "-1"),
        ("GATEWAY_TRITON_QUEUE_TIMEOUT_S", "0"),
        ("GATEWAY_UPLOAD_HEADERS", "Content-Type image/jpeg"),
        ("GATEWAY_UPLOAD_HEADERS", "Host: evil"),
        ("GATEWAY_MIN_SIZE", "60"),
        ("GATEWAY_MAX_SIZE", "32"),
        ("GATEWAY_PORT", "70000"),
        ("GATEWAY_TRITON_DEADLINE_S", "0"),
        ("GATEWAY_LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_values_fail_at_start_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    assert name.removeprefix("GATEWAY_") in str(err.value)


def test_a_misspelt_variable_is_an_error_not_ignored() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_UPLOAD_BACKOF"):
        Settings.from_env({"GATEWAY_UPLOAD_BACKOF": "1"})


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "TRITON_HTTP_PORT": "1"}) == Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_the_settings_table_covers_every_setting() -> None:
    rows = settings_table()
    assert len(rows) == len(dataclasses.fields(Settings))
    names = {name for name, _, _ in rows}
    assert {"GATEWAY_UPLOAD_BACKOFF", "GATEWAY_UPLOAD_ALLOWED_HOSTS", "GATEWAY_TRITON_URL"} <= names
    assert ("GATEWAY_UPLOAD_BACKOFF", "1,2,4") in {(n, d) for n, d, _ in rows}
    assert all(doc for _, _, doc in rows)


def test_the_deepfake_settings() -> None:
    s = Settings.from_env({})
    assert s.nvidia_api_url == "https://ai.api.nvidia.com/v1/cv/hive/deepfake-image-detection"
    assert (s.nvidia_api_key, s.deepfake_budget_s) == (None, 10.0)
    # The largest image whose base64 stays under NVIDIA's inline limit (< 180000 characters);
    # larger ones go through NVCF's assets, up to the maximum.
    assert len(base64.b64encode(bytes(s.deepfake_inline_max_bytes))) < 180_000
    assert len(base64.b64encode(bytes(s.deepfake_inline_max_bytes + 1))) >= 180_000
    assert s.nvidia_assets_url == "https://api.nvcf.nvidia.com/v2/nvcf/assets"
    assert s.deepfake_max_image_bytes == 10 * 1024 * 1024
    s = Settings.from_env(
        {
            "GATEWAY_NVIDIA_API_URL": "http://127.0.0.1:9/v1/cv/hive/deepfake-image-detection",
            "GATEWAY_NVIDIA_API_KEY": " nvapi-abc ",
            "GATEWAY_DEEPFAKE_BUDGET_S": "2.5",
        }
    )
    assert (s.nvidia_api_key, s.deepfake_budget_s) == ("nvapi-abc", 2.5)
    assert Settings.from_env({"GATEWAY_NVIDIA_API_KEY": ""}).nvidia_api_key is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_NVIDIA_API_URL", "ai.api.nvidia.com/v1"),
        ("GATEWAY_DEEPFAKE_BUDGET_S", "0"),
        ("GATEWAY_DEEPFAKE_INLINE_MAX_BYTES", "134998"),
        ("GATEWAY_NVIDIA_ASSETS_URL", "api.nvcf.nvidia.com/v2/nvcf/assets"),
        ("GATEWAY_DEEPFAKE_MAX_IMAGE_BYTES", "0"),
        ("GATEWAY_MODERATE_MAX_BYTES", "10"),
        ("GATEWAY_MODERATE_MAX_PIXELS", "0"),
    ],
)
def test_invalid_deepfake_and_moderate_values_fail_at_start(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name.removeprefix("GATEWAY_")):
        Settings.from_env({name: value})


def test_the_api_key_is_never_shown() -> None:
    settings = Settings.from_env({"GATEWAY_NVIDIA_API_KEY": "nvapi-s3cr3t"})
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings)
    # A key that cannot go into a header fails at start without being echoed.
    for bad in ("nvapi-s3cr3t\r\nX-Evil: 1", "nvapi-s3cr3té"):
        with pytest.raises(SettingsError) as err:
            Settings.from_env({"GATEWAY_NVIDIA_API_KEY": bad})
        assert "NVIDIA_API_KEY" in str(err.value) and "s3cr3t" not in str(err.value)


def test_api_keys_are_parsed_and_never_shown() -> None:
    keys = ("k" * 16, "0123456789abcdef+/=")
    s = Settings.from_env({"GATEWAY_API_KEYS": f" {keys[0]} ,{keys[1]}"})
    assert s.api_keys == keys
    assert keys[0] not in repr(s) and keys[1] not in repr(s)


def test_the_shutdown_timeout_covers_the_longest_request_unless_set() -> None:
    s = Settings()
    assert s.graceful_timeout_s == 120 + 4 * 10 + (1 + 2 + 4) + 5
    assert Settings(triton_deadline_s=10, upload_backoff=()).graceful_timeout_s == 10 + 10 + 5
    assert Settings(shutdown_timeout_s=3).graceful_timeout_s == 3
    # What the front door waits for (embedded/front_door.py) is the longest request, always.
    assert Settings(shutdown_timeout_s=3).longest_request_s == s.graceful_timeout_s


def test_gunicorn_keeps_spare_threads_beyond_the_in_flight_bound() -> None:
    assert Settings().threads_problem() is None  # 10 threads, 8 in flight
    assert Settings(threads=8 + 1, max_in_flight=7).threads_problem() is None
    problem = Settings(threads=8, max_in_flight=7).threads_problem()
    assert problem is not None
    assert "GATEWAY_THREADS (8) must be at least GATEWAY_MAX_IN_FLIGHT (7) + 2" in problem


def test_trusted_proxies_are_addresses_or_networks() -> None:
    assert Settings().trusted_proxies == ("127.0.0.1", "::1")
    s = Settings.from_env({"GATEWAY_TRUSTED_PROXIES": " 10.0.0.0/8, fd00::1 "})
    assert s.trusted_proxies == ("10.0.0.0/8", "fd00::1")
    with pytest.raises(SettingsError, match="GATEWAY_TRUSTED_PROXIES"):
        Settings.from_env({"GATEWAY_TRUSTED_PROXIES": "nginx.local"})
