"""The tenants file: what it may hold, the errors that name GATEWAY_TENANTS_FILE and the tenant
at fault, key rotation (several digests), the tenant `default` of the settings' keys and the
`anonymous` one without any key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import Settings
from gateway.settings import SettingsError
from gateway.tenants.tenant import ANONYMOUS, DEFAULT, Tenants, key_sha256
from gateway.triton.contract import Priority
from tests.gateway.tenants.helpers import tenant_entry

OLD, NEW, OTHER = "old-" + "o" * 20, "new-" + "n" * 20, "oth-" + "t" * 20


def tenants(tmp_path: Path, text: str, **settings: object) -> Tenants:
    path = tmp_path / "tenants.toml"
    path.write_text(text, "utf-8")
    return Tenants.from_settings(Settings(tenants_file=str(path), **settings))  # type: ignore[arg-type]


def test_a_file_of_tenants_with_rotation_and_the_settings_keys_as_default(tmp_path: Path) -> None:
    found = tenants(
        tmp_path,
        tenant_entry("storefront", OLD, NEW, extra='requests_per_minute = 120\nmax_concurrent = 8\n'
              'priority = "batch"'),
        api_keys=(OTHER,), default_requests_per_minute=5,
    )
    assert [t.name for t in found.all] == [DEFAULT, "storefront"]
    storefront = found.by_name["storefront"]
    assert (storefront.requests_per_minute, storefront.max_concurrent) == (120, 8)
    assert storefront.priority is Priority.BATCH
    # Both keys of a rotation work, and name the same tenant, each with its own owner id.
    old, new = found.identify(f"Bearer {OLD}"), found.identify(f"Bearer {NEW}")
    assert old is not None and new is not None
    assert old[0] is new[0] is storefront and old[1] != new[1]
    assert old[1] == key_sha256(OLD)
    default = found.identify(f"Bearer {OTHER}")
    assert default is not None and default[0].name == DEFAULT
    assert default[0].requests_per_minute == 5
    assert found.identify("Bearer not-a-key") is None
    assert found.identify(f"Basic {OLD}") is None


def test_without_any_key_everyone_is_the_anonymous_tenant() -> None:
    found = Tenants.from_settings(Settings(default_max_concurrent=3))
    assert not found.keyed
    tenant, owner = found.identify(None) or pytest.fail("anonymous refused")
    assert (tenant.name, tenant.max_concurrent, owner) == (ANONYMOUS, 3, ANONYMOUS)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not [ toml", "not TOML"),
        ("[other]\nx = 1\n", "unknown table 'other'"),
        ("", "no [[tenant]]"),
        # The entry's place names it, and its name once read.
        (tenant_entry("ok", OLD, extra="colour = 1"), "[[tenant]] 1 ('ok'): unknown field 'colour'"),
        ('[[tenant]]\nname = 5\nkey_sha256 = ["x"]\n', "[[tenant]] 1: name must be a string"),
        (tenant_entry("Bad_Name", OLD), "[[tenant]] 1 ('Bad_Name'): tenant name"),
        ('[[tenant]]\nname = "a"\nkey_sha256 = []\n', "('a'): key_sha256 must be a list"),
        ('[[tenant]]\nname = "a"\nkey_sha256 = ["ABC"]\n', "('a'): key_sha256 entries must be 64"),
        (tenant_entry("a", OLD, extra="requests_per_minute = -1"), "('a'): tenant 'a': quotas must be >= 0"),
        (tenant_entry("a", OLD, extra='max_concurrent = "2"'), "('a'): max_concurrent must be an integer"),
        (tenant_entry("a", OLD, extra="max_concurrent = true"), "('a'): max_concurrent must be an integer"),
        (tenant_entry("a", OLD, extra='priority = "urgent"'), "('a')"),
        (tenant_entry("a", OLD) + tenant_entry("b", NEW) + tenant_entry("a", OTHER), "tenant 'a' is named twice"),
        (tenant_entry("anonymous", OLD), "tenant 'anonymous' is named twice (or takes a reserved name)"),
        (tenant_entry("a", OLD) + tenant_entry("b", OLD), "a key belongs to two tenants"),
    ],
)
def test_a_bad_file_is_refused_naming_the_setting_and_the_tenant(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        tenants(tmp_path, text)
    message = str(raised.value)
    assert message.startswith("GATEWAY_TENANTS_FILE"), message
    assert says in message, message


def test_the_default_tenants_name_is_taken_when_settings_hold_keys(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="tenant 'default' is named twice"):
        tenants(tmp_path, tenant_entry("default", OLD), api_keys=(OTHER,))
    with pytest.raises(SettingsError, match="a key belongs to two tenants"):
        tenants(tmp_path, tenant_entry("shop", OTHER), api_keys=(OTHER,))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match=f"GATEWAY_TENANTS_FILE='{missing}'"):
        Tenants.from_settings(Settings(tenants_file=str(missing)))
