from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import InvalidRequest, UnsupportedMediaType
from gateway.fields import parse_body
from gateway.generate import Inline, UploadTo, check_inputs
from gateway.settings import Settings

SETTINGS = Settings(upload_allowed_hosts=("storage.test",))
URL = "https://storage.test/bucket/000/1.png?AWSAccessKeyId=A&Signature=%2Bx%3D&Expires=1"


def body(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse", "s3_prefix": URL, **fields}


def field_error(payload: Any, settings: Settings = SETTINGS) -> tuple[str | None, str]:
    with pytest.raises(InvalidRequest) as err:
        check_inputs(payload, settings)
    return err.value.field, err.value.message


def test_defaults_are_the_specs() -> None:
    req = check_inputs(body(), SETTINGS)
    assert (req.width, req.height, req.num_inference_steps) == (512, 1024, 15)
    assert req.response_format == "s3"
    assert req.upscale is True and req.scale == 2
    assert req.enable_nsfw_check is True
    assert (req.negative_prompt, req.seed, req.guidance_scale) == ("", None, None)
    assert isinstance(req.output, UploadTo) and req.output.url.host == "storage.test"


def test_the_specs_example_with_string_booleans() -> None:
    req = check_inputs(
        body(width=512, height=1024, num_inference_steps=15, response_format="s3",
             upscale="true", enable_nsfw_check="true"),
        SETTINGS,
    )
    assert req.upscale is True and req.enable_nsfw_check is True


@pytest.mark.parametrize(("raw", "expected"), [
    (True, True), (False, False), ("true", True), ("FALSE", False), ("True", True), ("fAlSe", False),
])
def test_booleans_accept_json_and_strings_in_any_case(raw: Any, expected: bool) -> None:
    assert check_inputs(body(upscale=raw), SETTINGS).upscale is expected


@pytest.mark.parametrize("raw", ["yes", "1", 1, 0, "", "true ", [], {}])
def test_other_boolean_forms_are_refused(raw: Any) -> None:
    assert field_error(body(enable_nsfw_check=raw))[0] == "enable_nsfw_check"


def test_integers_accept_digit_strings() -> None:
    req = check_inputs(body(width="256", height=128, num_inference_steps="2", seed="42"), SETTINGS)
    assert (req.width, req.height, req.num_inference_steps, req.seed) == (256, 128, 2, 42)


@pytest.mark.parametrize(
    "raw",
    [True, 512.0, "512.0", " 512", "+512", "-512", "5_12", "５１２", "0x200", "", [512], {"v": 1},
     "9" * 5000, 10**400],
)
def test_other_integer_forms_are_refused(raw: Any) -> None:
    assert field_error(body(width=raw))[0] == "width"


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"width": 100}, "width"),  # not a multiple of 8
        ({"width": 56}, "width"),
        ({"height": 2056}, "height"),
        ({"height": 0}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"guidance_scale": 1e400}, "guidance_scale"),
        ({"guidance_scale": 10**400}, "guidance_scale"),
        ({"response_format": "url"}, "response_format"),
        ({"response_format": "S3"}, "response_format"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": ["a"]}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"negative_prompt": {"text": "x"}}, "negative_prompt"),
        ({"s3_prefix": 1}, "s3_prefix"),
    ],
)
def test_out_of_range_and_wrong_type_values_name_the_field(fields: dict[str, Any], name: str) -> None:
    field, message = field_error(body(**fields))
    assert field == name
    assert name in message


def test_the_pixel_cap_applies_to_the_generated_size() -> None:
    settings = SETTINGS.replace(max_pixels=256 * 256)
    assert check_inputs(body(width=256, height=256), settings).width == 256
    field, message = field_error(body(width=256, height=264), settings)
    assert field == "width" and "65536" in message


def test_prompt_is_required() -> None:
    assert field_error({"s3_prefix": URL}) == ("prompt", "prompt is required")
    assert field_error({"prompt": None, "s3_prefix": URL})[0] == "prompt"


def test_null_means_not_given_for_optional_fields() -> None:
    req = check_inputs(body(seed=None, guidance_scale=None, negative_prompt=None, width=None), SETTINGS)
    assert (req.seed, req.guidance_scale, req.negative_prompt, req.width) == (None, None, "", 512)


def test_optional_fields_are_passed_on() -> None:
    req = check_inputs(body(negative_prompt="blurry", seed=7, guidance_scale="7.5"), SETTINGS)
    assert (req.negative_prompt, req.seed, req.guidance_scale) == ("blurry", 7, 7.5)


def test_unknown_fields_are_refused_with_a_hint() -> None:
    field, message = field_error(body(enable_nsfw_chek=True))
    assert field == "enable_nsfw_chek"
    assert "did you mean 'enable_nsfw_check'" in message


def test_s3_prefix_is_required_for_s3_and_refused_otherwise() -> None:
    assert field_error({"prompt": "p"})[0] == "s3_prefix"
    assert field_error(body(response_format="b64_json"))[0] == "s3_prefix"
    req = check_inputs({"prompt": "p", "response_format": "b64_json"}, SETTINGS)
    assert isinstance(req.output, Inline)


def test_s3_prefix_host_must_be_allowed() -> None:
    field, message = field_error(body(s3_prefix="https://elsewhere.test/b/1.png?x=1"))
    assert field == "s3_prefix" and "elsewhere.test" in message


@pytest.mark.parametrize("payload", [[], [body()], "text", 3, None, True])
def test_the_body_must_be_an_object(payload: Any) -> None:
    assert field_error(payload)[0] is None


class TestParseBody:
    def test_a_json_object_is_decoded(self) -> None:
        assert parse_body(b'{"prompt": "x"}', "application/json; charset=utf-8") == {"prompt": "x"}

    @pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/x-www-form-urlencoded",
                                       "multipart/form-data; boundary=x"])
    def test_other_content_types_are_415(self, ctype: str | None) -> None:
        with pytest.raises(UnsupportedMediaType):
            parse_body(b'{"prompt": "x"}', ctype)

    @pytest.mark.parametrize(
        "raw",
        [b"", b"   ", b"{", b"{'prompt': 'x'}", b'{"prompt": "\xff\xfe"}', b'{"width": NaN}',
         b'{"width": Infinity}', "{\"prompt\": \"x\"}".encode("utf-16"), b"[" * 100000],
    )
    def test_malformed_bodies_are_400(self, raw: bytes) -> None:
        with pytest.raises(InvalidRequest) as err:
            parse_body(raw, "application/json")
        assert err.value.status == 400

    def test_a_utf8_bom_is_allowed(self) -> None:
        assert parse_body(b'\xef\xbb\xbf{"prompt": "x"}', "application/json") == {"prompt": "x"}

    def test_duplicate_keys_are_refused_naming_the_key(self) -> None:
        with pytest.raises(InvalidRequest) as err:
            parse_body(b'{"width": 64, "width": 2048}', "application/json")
        assert err.value.field == "width"

    def test_error_messages_do_not_echo_the_body(self) -> None:
        secret = "Signature=SECRET"
        with pytest.raises(InvalidRequest) as err:
            parse_body(json.dumps({"s3_prefix": secret}).encode()[:-1], "application/json")
        assert "SECRET" not in err.value.message


def test_the_deepfake_check_is_off_by_default_and_needs_an_api_key() -> None:
    assert check_inputs(body(), SETTINGS).enable_deepfake_check is False
    assert field_error(body(enable_deepfake_check="true")) == (
        "enable_deepfake_check",
        (
            "enable_deepfake_check is not available: this gateway has no NVIDIA API key "
            "(GATEWAY_NVIDIA_API_KEY)"
        ),
    )
    configured = SETTINGS.replace(nvidia_api_key="nvapi-x")
    assert check_inputs(body(enable_deepfake_check="true"), configured).enable_deepfake_check
