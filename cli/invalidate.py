"""`nlpmesh cache invalidate`: drops prompt-cache entries of a template or a model, for one tenant or all.

Calls the cache service's Invalidate, which also tells every gateway's near tier
to drop what it holds.
"""
from __future__ import annotations

import grpc
from nlpmesh.cache.v1 import cache_pb2, cache_pb2_grpc


def invalidate(address: str, template_id: str | None = None, model: str | None = None,
               tenant: str | None = None, timeout_s: float = 10.0) -> int:
    """How many entries were removed. Exactly one of ``template_id`` and ``model``."""
    if (template_id is None) == (model is None):
        raise ValueError("give a template id or a model, not both")
    request = cache_pb2.InvalidateRequest(tenant=tenant or "")
    if template_id is not None:
        request.template_id = template_id
    else:
        request.model = model
    # Plaintext for now: the internal services' mTLS brings its own channel.
    with grpc.insecure_channel(address) as channel:
        return cache_pb2_grpc.CacheServiceStub(channel).Invalidate(request, timeout=timeout_s).removed


def cmd_invalidate(args, cache_address: str) -> int:
    try:
        removed = invalidate(cache_address, args.template, args.model, args.tenant)
    except grpc.RpcError as error:
        print(f"[nlpmesh] {error.code().name}: {error.details()}")
        return 1
    scope = f"template {args.template!r}" if args.template else f"model {args.model!r}"
    whose = f"tenant {args.tenant!r}" if args.tenant else "every tenant"
    print(f"[nlpmesh] {removed} entries of {scope} removed for {whose}")
    return 0


def add_parser(sub, run) -> None:
    cache = sub.add_parser("cache", help="the prompt cache: invalidate entries")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    inv = actions.add_parser("invalidate", help="drop the entries of a template or a model")
    which = inv.add_mutually_exclusive_group(required=True)
    which.add_argument("--template", metavar="ID")
    which.add_argument("--model", metavar="M")
    inv.add_argument("--tenant", help="only this tenant's entries (default: every tenant)")
    inv.add_argument("--addr", help="the cache service (default: the running mesh's, else 127.0.0.1:50054)")
    inv.set_defaults(run=run)
