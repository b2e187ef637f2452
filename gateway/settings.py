"""Gateway settings: where the internal services are, the prompt cache, and who may call."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from gateway.capacity import CapacitySettings
from gateway.downstream_health import HealthChecks
from gateway.quotas import QuotaSettings
from meshkit.settings import ServiceSettings, default_home

REPO_ROOT = Path(__file__).resolve().parents[1]


class GatewaySettings(ServiceSettings, service="gateway"):
    template_addr: str = "127.0.0.1:50052"
    tokenizer_addr: str = "127.0.0.1:50053"
    cache_addr: str = "127.0.0.1:50054"
    inference_addr: str = "127.0.0.1:50055"
    # Several models (gateway/model_routes.py): a JSON object {catalogue id: address}, each address as
    # inference_addr takes it (host:port, a comma list, dns:///name:port), e.g.
    # {"smollm2": "127.0.0.1:50055", "gemma3": "127.0.0.1:50065"}. Empty: one model, at inference_addr,
    # the one its replicas report.
    inference_addrs: dict[str, str] = Field(default_factory=dict)
    # The model a request without `model` gets: a key of inference_addrs; empty = its first.
    default_model: str = ""
    # The embedding replicas (services/embedding) Embed reaches, as inference_addr takes it; empty = Embed
    # answers NOT_FOUND (this mesh embeds nothing). The model is the one they report.
    embedding_addr: str = ""
    # The most texts one Embed request may carry.
    embed_max_texts: int = Field(default=256, ge=1)
    # The most characters one text may have (the embedding replica then holds it to the model's token limit).
    embed_max_text_chars: int = Field(default=32768, ge=1)
    # The gateway reads the prompt cache straight from Redis (one hop fewer on a
    # hit); stores go through the cache service. Empty = no prompt cache.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("NLPMESH_GATEWAY_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    # Redis keys of the prompt cache start with this; the cache service must use the same.
    key_prefix: str = "nlpmesh:pc"
    cache_lookup_timeout_s: float = 0.05
    # The near tier (promptcache/near_tier.py): hot answers kept in this process,
    # dropped on every announced invalidation. 0 bytes = off.
    near_cache_bytes: int = 32 * 1024 * 1024
    near_cache_max_age_s: float = 60.0
    # API keys (gateway/auth.py): "on" refuses a call without a key of the
    # keys file; "off" (logged as a WARNING at start) serves every caller as `tenant`.
    auth: Literal["on", "off"] = "on"
    auth_keys_file: Path = Field(default_factory=lambda: default_home() / "keys.toml")
    auth_reload_s: float = 1.0  # how often the keys file is checked for changes
    auth_cache_size: int = 10_000  # verified keys remembered, so a known key costs no sha256
    tenant: str = "public"  # every caller's tenant when auth is off
    # Per-tenant quotas (gateway/quotas.py), shared by the replicas through Redis.
    # With Redis failing, or no REDIS_URL, each replica holds a tenant to limit / quota_replicas.
    quota_key_prefix: str = "nlpmesh:q"
    quota_timeout_s: float = 0.05
    quota_replicas: int = Field(default=1, ge=1)
    quota_fallback_s: float = 5.0
    quota_stream_lease_s: float = 30.0
    # Admission control, i.e. capacity (gateway/capacity.py), per model: a cache miss is refused with
    # RESOURCE_EXHAUSTED and RetryInfo, before any hop, while this gateway has as many of the
    # model's generations in flight as its inference replicas hold (their reported max_running +
    # max_queue, or admission_max_in_flight when set), or while their latest reports, younger
    # than admission_full_hold_s, said they were full.
    admission: Literal["on", "off"] = "on"
    admission_max_in_flight: int = Field(default=0, ge=0)
    admission_full_hold_s: float = Field(default=0.5, ge=0)
    admission_retry_after_s: float = Field(default=1.0, gt=0)
    # Generations over a list of inference endpoints (gateway/affinity.py): "prefix" sends prompts
    # sharing their first prefix block to the same replica (consistent hashing, bounded load); "round_robin"
    # leaves them to the balanced channel. A dns:/// name: over the addresses it resolves to. One endpoint: no choice.
    inference_routing: Literal["prefix", "round_robin"] = "prefix"
    # How many of the prompt's first tokens make the route key (gateway/affinity.py); independent of
    # the inference service's prefix_block_tokens.
    affinity_block_tokens: int = Field(default=16, ge=1, le=1024)
    # A replica takes a key's call while its generations in flight stay within this factor of the mean.
    affinity_load_factor: float = Field(default=1.25, ge=1.0, le=10.0)
    # How often a dns:/// inference address is resolved again for prefix-affine routing.
    affinity_resolve_s: float = Field(default=5.0, gt=0)
    # Request coalescing (gateway/coalescing.py): identical concurrent requests (one tenant, one model, the
    # same prompt, deterministic sampling, not CACHE_MODE_BYPASS) share one generation. "off": each generates.
    coalescing: Literal["on", "off"] = "on"
    # Across replicas sharing the prompt cache's Redis (gateway/coalescing_replicas.py): the generating replica
    # holds a lease on the key, which lapses after this long unless renewed (it is, every third of it).
    coalescing_lease_s: float = Field(default=2.0, gt=0)
    # The most a request waits for the answer another replica generates (its budget bounds it too); then it
    # generates its own.
    coalescing_wait_s: float = Field(default=30.0, ge=0)
    # How often a request waiting for another replica's answer looks for it in Redis.
    coalescing_poll_s: float = Field(default=0.025, gt=0)
    # A lease call slower than this counts as Redis failing: coalescing stays within the replica a while.
    coalescing_redis_timeout_s: float = Field(default=0.1, gt=0)
    # Per-hop budgets and the default total (gateway/budgets.py).
    budgets_file: Path = Field(default_factory=lambda: REPO_ROOT / "deploy" / "budgets.toml")
    # Calls made outside any request: warm-up probes, the catalog refresh, stores.
    template_timeout_s: float = 2.0
    cache_store_timeout_s: float = 2.0
    inference_timeout_s: float = 30.0
    catalog_refresh_s: float = 10.0
    ready_timeout_s: float = 600.0
    # Once ready, template, tokenizer and inference are checked (grpc.health.v1) every interval; after
    # `failures` failed checks in a row the generation path turns NOT_SERVING (gateway/downstream_health.py).
    downstream_health_interval_s: float = Field(default=1.0, gt=0)
    downstream_health_timeout_s: float = Field(default=1.0, gt=0)
    downstream_health_failures: int = Field(default=2, ge=1)
    # The access log (gateway/access_log.py): one INFO line per finished call (ids, tenant, model, template,
    # status, cache, per-hop ms, tokens; never prompt or answer text). False: none, or a plain line per call at
    # DEBUG, as every service writes.
    access_log: bool = True
    # The edge: callers are not asked for a certificate (API keys name them); the
    # internal services do ask the gateway for one.
    tls_require_client_cert: bool = False
    # How often (s) the gateway reads its TLS files as a client of the internal services: when its CA bundle,
    # certificate or key changed, it opens new channels with them and retires the old ones (calls in flight
    # finish on them). 0: read at start only.
    tls_reload_s: float = Field(default=10.0, ge=0)

    def quota_settings(self) -> QuotaSettings:
        return QuotaSettings(key_prefix=self.quota_key_prefix, timeout_s=self.quota_timeout_s,
                             replicas=self.quota_replicas, fallback_s=self.quota_fallback_s,
                             stream_lease_s=self.quota_stream_lease_s)

    def health_checks(self) -> HealthChecks:
        return HealthChecks(self.downstream_health_interval_s, self.downstream_health_timeout_s,
                            self.downstream_health_failures)

    def capacity_settings(self) -> CapacitySettings:
        return CapacitySettings(enabled=self.admission == "on", max_in_flight=self.admission_max_in_flight,
                                 full_hold_s=self.admission_full_hold_s, retry_after_s=self.admission_retry_after_s)
