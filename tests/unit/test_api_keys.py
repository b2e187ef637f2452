"""The keys file and the gateway's key check, with plain objects (no gRPC)."""
from __future__ import annotations

import asyncio
import logging
import os
import stat

import pytest

from gateway import api_keys
from gateway.api_keys import KeyFileError, create_key, load_keys, parse_key, revoke_key
from gateway.auth import MALFORMED, MISSING, UNKNOWN, KeyFileAuth
from gateway.tenant import KeyScope, Tenant, TenantLimits
from meshkit.errors import Unauthenticated
from tests.polling import until


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_a_created_key_is_random_and_only_its_hash_is_in_the_file(tmp_path):
    path = tmp_path / "keys.toml"
    key_id, key = create_key(path, Tenant("acme", TenantLimits(requests_per_s=5.0, max_streams=2)))
    other_id, other = create_key(path, Tenant("acme"))
    assert key.startswith(f"nlpm_{key_id}_") and key != other and key_id != other_id
    _, secret = parse_key(key)
    assert len(secret) >= 40  # 256 bits, url-safe base64
    text = path.read_text()
    assert secret not in text and key not in text and api_keys.secret_digest(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    records = load_keys(path)
    assert records[key_id].tenant == Tenant("acme", TenantLimits(requests_per_s=5.0, max_streams=2))
    assert records[other_id].tenant.limits == TenantLimits()


def test_revoke_removes_only_that_key(tmp_path):
    path = tmp_path / "keys.toml"
    first, _ = create_key(path, Tenant("acme"))
    second, _ = create_key(path, Tenant("globex", prompt_cache=False))
    assert revoke_key(path, first)
    assert not revoke_key(path, first)
    records = load_keys(path)
    assert set(records) == {second} and records[second].tenant.prompt_cache is False


def test_a_tenant_id_outside_the_plain_charset_is_refused(tmp_path):
    with pytest.raises(ValueError):
        create_key(tmp_path / "keys.toml", Tenant('acme"\n[keys.x]'))


@pytest.mark.parametrize("key", ["", "nlpm", "nlpm_zz_secretsecretsecretsecret", "sk_0123456789abcdef_" + "s" * 40,
                                 "nlpm_0123456789abcdef_short"])
def test_malformed_keys_do_not_parse(key):
    assert parse_key(key) is None


def test_the_check_names_the_tenant_of_a_valid_key_and_refuses_the_rest(tmp_path):
    path = tmp_path / "keys.toml"
    key_id, key = create_key(path, Tenant("acme"))
    auth = KeyFileAuth(path)
    assert auth.tenant_for(bearer(key)).id == "acme"
    assert auth.tenant_for(bearer(key)).id == "acme"  # the second time from the verified map
    wrong_secret = f"nlpm_{key_id}_{'x' * 43}"
    cases = {(): MISSING, (("authorization", key),): MALFORMED, bearer("nlpm_nope"): MALFORMED,
             bearer(wrong_secret): UNKNOWN, bearer(f"nlpm_{'0' * 16}_{'y' * 43}"): UNKNOWN}
    for metadata, message in cases.items():
        with pytest.raises(Unauthenticated) as caught:
            auth.tenant_for(metadata)
        assert caught.value.message == message
        assert "x" * 20 not in caught.value.message and key not in caught.value.message


def test_a_known_key_costs_no_hash_and_the_verified_map_stays_bounded(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    keys = [create_key(path, Tenant(f"t{i}"))[1] for i in range(5)]
    auth = KeyFileAuth(path, cache_size=3)
    auth.tenant_for(bearer(keys[0]))
    hashed = []
    monkeypatch.setattr(api_keys, "secret_digest", lambda s: hashed.append(s) or "0" * 64)
    assert auth.tenant_for(bearer(keys[0])).id == "t0"
    assert hashed == []
    monkeypatch.undo()
    for key in keys:
        auth.tenant_for(bearer(key))
    assert len(auth._verified) == 3


def test_a_revoked_key_is_refused_after_the_reload(tmp_path):
    path = tmp_path / "keys.toml"
    key_id, key = create_key(path, Tenant("acme"))
    _, kept = create_key(path, Tenant("acme"))
    auth = KeyFileAuth(path)
    auth.tenant_for(bearer(key))
    assert not auth.reload_if_changed()  # nothing changed: nothing re-read
    revoke_key(path, key_id)
    assert auth.reload_if_changed()
    with pytest.raises(Unauthenticated):
        auth.tenant_for(bearer(key))  # the verified map was emptied too
    assert auth.tenant_for(bearer(kept)).id == "acme"


def test_a_malformed_file_keeps_the_old_keys_and_is_logged_without_its_content(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    _, key = create_key(path, Tenant("acme"))
    auth = KeyFileAuth(path)
    path.write_text('[keys.0123456789abcdef]\ntenant = "acme"\nsecret_sha256 = "SECRETISH"\n')
    with caplog.at_level(logging.ERROR, logger="nlpmesh.gateway.auth"):
        assert not auth.reload_if_changed()
        assert not auth.reload_if_changed()  # logged once per change, not at every look
    assert auth.tenant_for(bearer(key)).id == "acme"
    [record] = caplog.records
    assert "stay in force" in record.getMessage() and "SECRETISH" not in record.getMessage()
    path.write_text("not toml [")
    assert not auth.reload_if_changed()
    assert auth.tenant_for(bearer(key)).id == "acme"


def test_a_missing_file_holds_no_keys(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    with caplog.at_level(logging.WARNING, logger="nlpmesh.gateway.auth"):
        auth = KeyFileAuth(path)
    assert auth.key_count == 0 and "does not exist" in caplog.text
    _, key = create_key(path, Tenant("acme"))
    assert auth.reload_if_changed()
    assert auth.tenant_for(bearer(key)).id == "acme"
    os.unlink(path)
    assert auth.reload_if_changed()
    with pytest.raises(Unauthenticated):
        auth.tenant_for(bearer(key))


def tenant_of(auth, key: str) -> str | None:
    try:
        return auth.tenant_for(bearer(key)).id
    except Unauthenticated:
        return None


def test_the_watcher_picks_up_a_new_key_without_being_asked(tmp_path):
    path = tmp_path / "keys.toml"
    create_key(path, Tenant("acme"))

    async def main():
        auth = KeyFileAuth(path, reload_s=0.05)
        auth.start()
        _, key = create_key(path, Tenant("globex"))
        try:
            return await until(lambda: tenant_of(auth, key), what="the watcher to load the new key")
        finally:
            await auth.close()

    assert asyncio.run(main()) == "globex"


def test_an_invalid_record_is_a_key_file_error(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text('[keys.0123456789abcdef]\ntenant = "acme"\nsecret_sha256 = "' + "a" * 64 + '"\nmax_streams = -1\n')
    with pytest.raises(KeyFileError):
        load_keys(path)


def test_a_keys_scope_survives_the_file_and_a_malformed_scope_is_a_key_file_error(tmp_path):
    path = tmp_path / "keys.toml"
    key_id, _ = create_key(path, Tenant("desk", scope=KeyScope(templates=frozenset({"a", "b.v2"}))))
    record = load_keys(path)[key_id]
    assert record.tenant.scope == KeyScope(templates=frozenset({"a", "b.v2"}), models=None)
    text = path.read_text()
    for bad in ('models = []', 'models = "a"', 'models = [1]', 'models = ["a b"]'):
        path.write_text(text + bad + "\n")
        with pytest.raises(KeyFileError, match=key_id):
            load_keys(path)
