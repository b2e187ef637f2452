"""`nlpmesh keys`: API keys in a keys file (gateway/api_keys.py), and the local key.

``keys create`` prints the new key once: the file keeps only the sha256 of its
secret. ``keys list`` shows key ids, tenants and limits, never keys or hashes.
``keys revoke`` removes a key; every gateway reading the file refuses it within
about a second (NLPMESH_GATEWAY_AUTH_RELOAD_S).

The local key (tenant ``local``) is what ``nlpmesh up`` and ``demo`` give their
own gateway and what ``ask`` sends: made on first run, kept in
``$NLPMESH_HOME/local.key`` (mode 0600), replaced when it was revoked.
"""
from __future__ import annotations

import os
from pathlib import Path

from gateway.api_keys import KeyFileError, create_key, load_keys, parse_key, revoke_key
from gateway.tenant import KeyScope, Tenant, TenantLimits
from meshkit.settings import default_home

LOCAL_TENANT = "local"
# A key for `nlpmesh ask` that is not the local one (a remote gateway's).
API_KEY_ENV = "NLPMESH_API_KEY"


def default_keys_file() -> Path:
    return default_home() / "keys.toml"


def local_key_file() -> Path:
    return default_home() / "local.key"


def local_key(keys_file: Path | None = None, key_file: Path | None = None) -> str:
    """The local key, made (and added to ``keys_file``) when there is none or it was revoked."""
    keys_file = keys_file or default_keys_file()
    key_file = key_file or local_key_file()
    if key_file.exists():
        key = key_file.read_text().strip()
        parsed = parse_key(key)
        record = load_keys(keys_file).get(parsed[0]) if parsed else None
        if record is not None and record.matches(parsed[1]):
            return key
    _, key = create_key(keys_file, Tenant(LOCAL_TENANT))
    _write_private(key_file, key + "\n")
    return key


def saved_api_key() -> str | None:
    """The key ``nlpmesh ask`` sends: $NLPMESH_API_KEY, else the local key if one was made."""
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    path = local_key_file()
    return path.read_text().strip() if path.exists() else None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)  # an older file may have had another mode


def cmd_create(args) -> int:
    limits = TenantLimits(requests_per_s=args.rps, tokens_per_min=args.tokens_per_min, max_streams=args.max_streams)
    scope = KeyScope(_ids(args.templates), _ids(args.models))
    try:
        key_id, key = create_key(_file(args), Tenant(args.tenant, limits, prompt_cache=not args.no_prompt_cache,
                                                     scope=scope))
    except (ValueError, KeyFileError) as error:
        print(f"[nlpmesh] {error}")
        return 2
    print(f"[nlpmesh] key {key_id} for tenant {args.tenant!r} added to {_file(args)}")
    print("[nlpmesh] the key, shown this once (only its hash is kept):")
    print(key)
    return 0


def cmd_list(args) -> int:
    try:
        records = load_keys(_file(args))
    except KeyFileError as error:
        print(f"[nlpmesh] {error}")
        return 1
    print(f"{'key id':<18}{'tenant':<20}{'rps':>8}{'tokens/min':>12}{'streams':>9}  {'cache':<6}{'created':<22}scope")
    for record in sorted(records.values(), key=lambda r: (r.tenant.id, r.created)):
        tenant, limits = record.tenant, record.tenant.limits
        print(f"{record.key_id:<18}{tenant.id:<20}{_limit(limits.requests_per_s):>8}"
              f"{_limit(limits.tokens_per_min):>12}{_limit(limits.max_streams):>9}"
              f"  {'on' if tenant.prompt_cache else 'off':<6}{record.created:<22}{_scope(tenant.scope)}")
    return 0


def cmd_revoke(args) -> int:
    if not revoke_key(_file(args), args.key_id):
        print(f"[nlpmesh] no key {args.key_id!r} in {_file(args)}")
        return 1
    print(f"[nlpmesh] key {args.key_id} revoked; gateways reading {_file(args)} refuse it within seconds")
    return 0


def _file(args) -> Path:
    return Path(args.file) if args.file else default_keys_file()


def _ids(listed: str | None) -> frozenset[str] | None:
    """``a,b`` from the command line; None (every one) when not given."""
    return None if listed is None else frozenset(one.strip() for one in listed.split(",") if one.strip())


def _scope(scope: KeyScope) -> str:
    parts = [f"{what}={','.join(sorted(ids))}" for what, ids in (("templates", scope.templates),
                                                                 ("models", scope.models)) if ids is not None]
    return " ".join(parts) or "all"


def _limit(value) -> str:
    return "-" if value is None else f"{value:g}"


def add_parser(sub) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (a keys file the gateways read)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    file_help = "the keys file (default: $NLPMESH_HOME/keys.toml)"
    create = actions.add_parser("create", help="a new key for a tenant, printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rps", type=float, help="requests per second (default: no limit)")
    create.add_argument("--tokens-per-min", type=int, help="generated tokens per minute (default: no limit)")
    create.add_argument("--max-streams", type=int, help="requests in flight at once (default: no limit)")
    create.add_argument("--no-prompt-cache", action="store_true", help="the tenant neither reads nor writes it")
    create.add_argument("--templates", metavar="ID,ID",
                        help="the only templates the key may render (default: every one; with a list, no chat)")
    create.add_argument("--models", metavar="ID,ID", help="the only models the key may use (default: every one)")
    create.add_argument("--file", help=file_help)
    create.set_defaults(run=cmd_create)
    listing = actions.add_parser("list", help="key ids, tenants and limits (never keys or hashes)")
    listing.add_argument("--file", help=file_help)
    listing.set_defaults(run=cmd_list)
    revoke = actions.add_parser("revoke", help="remove a key; gateways refuse it within seconds")
    revoke.add_argument("key_id")
    revoke.add_argument("--file", help=file_help)
    revoke.set_defaults(run=cmd_revoke)
