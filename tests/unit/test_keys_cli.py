"""`nlpmesh keys` and the local key, as the CLI runs them (no gateway)."""
import stat

from cli import keys
from cli.main import main
from gateway.api_keys import load_keys, parse_key


def test_the_local_key_is_made_once_kept_private_and_replaced_when_revoked(tmp_path, monkeypatch):
    monkeypatch.setenv("NLPMESH_HOME", str(tmp_path))
    monkeypatch.delenv(keys.API_KEY_ENV, raising=False)
    first = keys.local_key()
    assert keys.local_key() == first and keys.saved_api_key() == first
    assert stat.S_IMODE(keys.local_key_file().stat().st_mode) == 0o600
    key_id, _ = parse_key(first)
    assert load_keys(tmp_path / "keys.toml")[key_id].tenant.id == "local"
    assert main(["keys", "revoke", key_id]) == 0
    second = keys.local_key()
    assert second != first and keys.saved_api_key() == second
    monkeypatch.setenv(keys.API_KEY_ENV, "nlpm_elsewhere")
    assert keys.saved_api_key() == "nlpm_elsewhere"


def test_create_prints_the_key_once_and_list_never_shows_keys_or_hashes(tmp_path, capsys):
    path = tmp_path / "deploy" / "keys.toml"
    assert main(["keys", "create", "--tenant", "acme", "--rps", "5", "--max-streams", "2", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    key_id, secret = parse_key(key)
    assert main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing
    assert secret not in listing and load_keys(path)[key_id].secret_sha256 not in listing
    assert main(["keys", "revoke", key_id, "--file", str(path)]) == 0
    assert main(["keys", "revoke", key_id, "--file", str(path)]) == 1
