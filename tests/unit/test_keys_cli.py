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


def test_create_with_a_scope_writes_it_and_list_shows_it_and_a_bad_scope_is_refused(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    assert main(["keys", "create", "--tenant", "desk", "--templates", "finance_question, support_answer",
                 "--models", "smollm2", "--file", str(path)]) == 0
    key_id, _ = parse_key(capsys.readouterr().out.strip().splitlines()[-1])
    scope = load_keys(path)[key_id].tenant.scope
    assert scope.templates == {"finance_question", "support_answer"} and scope.models == {"smollm2"}
    assert main(["keys", "create", "--tenant", "open", "--file", str(path)]) == 0
    open_id, _ = parse_key(capsys.readouterr().out.strip().splitlines()[-1])
    assert load_keys(path)[open_id].tenant.scope.templates is None  # no list: every template
    assert main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "templates=finance_question,support_answer models=smollm2" in listing and listing.count(" all") == 1
    for bad in (["--templates", ""], ["--models", 'x"]\nmodels = ["y']):
        assert main(["keys", "create", "--tenant", "desk", *bad, "--file", str(path)]) == 2
    assert len(load_keys(path)) == 2  # nothing written for a refused scope
