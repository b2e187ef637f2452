"""The prompt cache, the prefix-KV tier and invalidation against a real 3-master Redis Cluster.

The cluster is started by the fixture (tests/redis_cluster.py) from the installed
redis-server; the code under test gets only its ``redis+cluster://`` URL and
talks through redis-py's cluster client. Each test checks where keys landed, so
a layout that put everything on one master (or one that needs several slots in
one command: CROSSSLOT) fails here.
"""
import asyncio
import random
import uuid

import pytest
import redis
import torch

from cli.redis_acl import RedisUsers
from cli.redis_acl import write as write_acl
from gateway.quotas import Quotas, QuotaSettings
from gateway.tenant import Tenant, TenantLimits
from meshkit.errors import ResourceExhausted, Unavailable
from meshkit.redis_connect import is_cluster_client
from meshkit.sampling import Sampling
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt
from promptcache.near_tier import NearCache
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from services.inference.prefix import PrefixCache, RedisBlocks
from tests.integration.test_redis_tls import make_pki
from tests.polling import until
from tests.redis_cluster import RedisCluster, running_redis_cluster

GREEDY = Sampling(max_new_tokens=16, temperature=0.0)
TENANTS = [f"tenant-{n}" for n in range(8)]
TEMPLATES = [f"template-{n}" for n in range(4)]


def answer(text: str = "Paris.") -> CachedAnswer:
    return CachedAnswer(text=text, finish_reason=1, prompt_tokens=12, completion_tokens=2, model="m1")


def template_key(tenant="acme", template="capital", model="m1", country="France") -> PromptCacheKey:
    return PromptCacheKey(tenant, model, "r1", TemplatePrompt(template, "1", {"country": country}), GREEDY)


def chat_key(tenant="acme", model="m1", question="hi") -> PromptCacheKey:
    return PromptCacheKey(tenant, model, "r1", ChatPrompt((("user", question),)), GREEDY)


@pytest.fixture(scope="module")
def cluster() -> RedisCluster:
    with running_redis_cluster() as running:
        yield running


@pytest.fixture
def prefix() -> str:
    return f"test:pc:{uuid.uuid4().hex[:12]}"


def with_cache(url: str, prefix: str, body, timeout_s: float = 2.0):
    async def main():
        cache = PromptCache(redis_client(url), prefix=prefix, ttl_s=600, timeout_s=timeout_s)
        assert is_cluster_client(cache.redis) and cache.cluster
        try:
            return await body(cache)
        finally:
            await cache.close()
    return asyncio.run(main())


def masters_holding(cluster, keys: list[str]) -> set[int]:
    return {cluster.node_of(key) for key in keys}


def test_a_store_then_a_lookup_hits_through_the_cluster_and_stats_add_up(cluster, prefix):
    async def body(cache: PromptCache):
        assert await cache.lookup(template_key()) is None
        assert await cache.store(template_key(), answer())
        assert await cache.store(chat_key(), answer("Hello."))
        assert await cache.lookup(template_key()) == answer()
        assert await cache.lookup(chat_key()) == answer("Hello.")
        # The hit and miss counts go out just after each lookup, to sharded stats hashes.
        await until(lambda: _stats_are(cache, hits=2, misses=1, stores=2), what="the cluster's stats")
        assert await cache.add_hits(3)
        assert (await cache.stats()).hits == 5

    with_cache(cluster.url, prefix, body)
    with cluster.client() as admin:
        shards = list(admin.scan_iter(match=f"{prefix}:stats:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES))
    assert len(shards) >= 2  # counting does not load one key


async def _stats_are(cache: PromptCache, **expected) -> bool:
    stats = await cache.stats()
    return (stats.hits, stats.misses, stats.stores) == (expected["hits"], expected["misses"], expected["stores"])


def test_a_template_is_invalidated_for_every_tenant_on_every_master(cluster, prefix):
    keys = [template_key(tenant, template, country=country)
            for tenant in TENANTS for template in ("capital", "weather") for country in ("France", "Spain")]

    async def body(cache: PromptCache):
        for key in keys:
            assert await cache.store(key, answer())
        entries = [key.redis_key(prefix) for key in keys]
        capital = [entry for key, entry in zip(keys, entries) if key.prompt.id == "capital"]
        assert len(masters_holding(cluster, capital)) > 1  # the entries really live on several masters
        assert await cache.invalidate_template("capital") == len(capital)
        for key in keys:
            expected = None if key.prompt.id == "capital" else answer()
            assert await cache.lookup(key) == expected, key
        return capital

    capital = with_cache(cluster.url, prefix, body)
    with cluster.client() as admin:
        assert sum(admin.exists(entry) for entry in capital) == 0


def test_a_template_is_invalidated_for_one_tenant_only(cluster, prefix):
    async def body(cache: PromptCache):
        for tenant in ("acme", "globex"):
            for country in ("France", "Spain", "Italy"):
                assert await cache.store(template_key(tenant, country=country), answer())
        assert await cache.invalidate_template("capital", tenant="acme") == 3
        assert await cache.lookup(template_key("acme")) is None
        assert await cache.lookup(template_key("globex")) == answer()
        assert await cache.invalidate_template("capital", tenant="acme") == 0  # nothing left: no error

    with_cache(cluster.url, prefix, body)


def test_a_model_is_invalidated_across_templates_chats_and_masters(cluster, prefix):
    keys = [template_key("acme", template, model) for template in TEMPLATES for model in ("m1", "m2")]
    keys += [chat_key("acme", model, f"question {n}") for n in range(6) for model in ("m1", "m2")]

    async def body(cache: PromptCache):
        for key in keys:
            assert await cache.store(key, answer())
        m1 = [key.redis_key(prefix) for key in keys if key.model == "m1"]
        assert len(masters_holding(cluster, m1)) > 1
        assert await cache.invalidate_model("m1", tenant="acme") == len(m1)
        for key in keys:
            assert (await cache.lookup(key) is None) == (key.model == "m1"), key
        # The template index no longer names them either way: a template invalidation finds nothing of m1.
        assert await cache.invalidate_template(TEMPLATES[0], tenant="acme") == 1  # only its m2 answer

    with_cache(cluster.url, prefix, body)


def test_a_lookup_never_crosses_tenants(cluster, prefix):
    async def body(cache: PromptCache):
        assert await cache.store(template_key("acme"), answer())
        assert await cache.store(chat_key("acme"), answer())
        assert await cache.lookup(template_key("globex")) is None
        assert await cache.lookup(chat_key("globex")) is None
        assert await cache.lookup(template_key("acme")) == answer()

    with_cache(cluster.url, prefix, body)


def test_the_near_tier_is_cleared_by_an_invalidation_published_on_the_cluster(cluster, prefix):
    async def main():
        near = NearCache(PromptCache(redis_client(cluster.url), prefix=prefix, ttl_s=600, timeout_s=2.0),
                         max_bytes=1 << 20, max_age_s=600)
        admin = PromptCache(redis_client(cluster.url), prefix=prefix, ttl_s=600, timeout_s=2.0)
        near.start()  # before its warm-up, as the gateway does: the first subscription may fail, then it retries
        await near.warm_up()
        try:
            assert await admin.store(template_key(), answer())
            await until(lambda: _subscribers(cluster, admin.invalidations_channel) >= 1, timeout_s=10,
                        what="the near tier's subscription")
            assert await near.lookup(template_key()) == answer()
            assert len(near) == 1
            assert await admin.invalidate_template("capital") == 1
            await until(lambda: len(near) == 0, what="the near tier to drop its copy")
            assert await near.lookup(template_key()) is None
        finally:
            await near.close()
            await admin.close()

    asyncio.run(main())


def _subscribers(cluster: RedisCluster, channel: str) -> int:
    """Subscribers of ``channel`` on every node (PUBSUB NUMSUB counts a node's own only)."""
    total = 0
    for port in cluster.ports:
        with cluster.node_client(port) as node:
            total += sum(count for _, count in node.pubsub_numsub(channel))
    return total


# -- prefix KV ----------------------------------------------------------------

BLOCK = 4
SHAPE = (2, 2, 1, BLOCK, 8)  # (k/v, layers, kv_heads, block tokens, head dim)


def prefix_cache(shared: RedisBlocks | None) -> PrefixCache:
    cache = PrefixCache(model="tiny", revision="r1", block_tokens=BLOCK, shared=shared, redis_min_sightings=1)
    cache.configure(layers=SHAPE[1], kv_heads=SHAPE[2], head_dim=SHAPE[4], dtype=torch.float32)
    return cache


def chain_kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn((2, SHAPE[1], SHAPE[2], tokens, SHAPE[4]), generator=torch.Generator().manual_seed(seed))


def test_prefix_blocks_of_a_chain_share_a_slot_and_come_back_in_one_mget(cluster):
    namespace = f"test:kv:{uuid.uuid4().hex[:12]}"
    rng = random.Random(7)
    chains = [[rng.randrange(1000, 40000) for _ in range(6 * BLOCK + 1)] for _ in range(12)]
    writer, reader = RedisBlocks(cluster.url, key_prefix=namespace, budget_s=2.0), None
    try:
        first = prefix_cache(writer)
        kv_of = {}
        for seed, ids in enumerate(chains):
            keys = first.keys("acme", ids)
            kv_of[seed] = chain_kv(len(keys) * BLOCK, seed)
            first.remember(keys, 0, lambda start, end, kv=kv_of[seed]: kv[:, :, :, start:end].clone())
        writer.flush()
        with cluster.client() as admin:
            names = list(admin.scan_iter(match=f"{namespace}:*", target_nodes=redis.cluster.RedisCluster.PRIMARIES))
        assert len(names) == 6 * len(chains)
        assert len(masters_holding(cluster, names)) > 1  # chains spread over the masters
        for ids in chains:  # ...while each chain keeps to one slot
            assert len({redis.crc.key_slot(writer._name(key).encode()) for key in first.keys("acme", ids)}) == 1

        reader = RedisBlocks(cluster.url, key_prefix=namespace, budget_s=2.0)
        second = prefix_cache(reader)  # another replica: nothing local, everything from the cluster
        for seed, ids in enumerate(chains):
            match = second.match(second.keys("acme", ids))
            assert match.tokens == 6 * BLOCK
            assert torch.equal(match.kv, kv_of[seed])
        assert second.match(second.keys("globex", chains[0])).tokens == 0  # another tenant: no block of acme's
        assert not reader.cooling_down  # no read failed (a CROSSSLOT would have)
    finally:
        writer.close()
        if reader is not None:
            reader.close()


def test_a_cluster_that_is_down_at_start_is_a_miss_not_a_crash():
    from tests.conftest import free_port

    blocks = RedisBlocks(f"redis+cluster://127.0.0.1:{free_port()}/0", budget_s=0.2, cooldown_s=60)
    try:
        assert blocks.get([b"k" * 40]) is None
        assert blocks.cooling_down
        assert blocks.put([(b"k" * 40, chain_kv(BLOCK, 0))]).result() == []
    finally:
        blocks.close()


# -- the shipped ACL users, on a cluster ---------------------------------------------------


@pytest.fixture(scope="module")
def acl_cluster(tmp_path_factory):
    """A 3-master cluster run with deploy/redis/users.acl (rendered with fresh passwords) on every node."""
    users = RedisUsers.make()
    acl_file, _ = write_acl(tmp_path_factory.mktemp("cluster-acl"), users, "127.0.0.1", 0)
    with running_redis_cluster("--aclfile", str(acl_file), auth=("admin", users.passwords["admin"])) as running:
        yield running, users


def _refused(cluster: RedisCluster) -> list[tuple[str, str]]:
    refused = []
    for port in cluster.ports:
        with cluster.node_client(port) as node:
            refused += [(entry["username"], entry["object"]) for entry in node.acl_log()]
    return refused


def test_each_service_user_works_on_a_cluster_with_the_shipped_acl(acl_cluster):
    cluster, users = acl_cluster
    url = lambda user: users.url(user, "127.0.0.1", cluster.ports[0], scheme="redis+cluster")  # noqa: E731
    tenant = Tenant(uuid.uuid4().hex, TenantLimits(requests_per_s=2, tokens_per_min=10, max_streams=1))

    async def main():
        cache = PromptCache(redis_client(url("cache")), prefix="nlpmesh:pc", ttl_s=60, timeout_s=2.0)
        gateway = NearCache(PromptCache(redis_client(url("gateway")), prefix="nlpmesh:pc", ttl_s=60, timeout_s=2.0),
                            1 << 20, 60, flush_every_s=0.05)
        quota_client = redis_client(url("gateway"))
        quotas = Quotas(quota_client, QuotaSettings(timeout_s=2.0))
        gateway.start()
        await gateway.warm_up()
        try:
            keys = [template_key(f"tenant-{n}", country="France") for n in range(6)] + [chat_key("acme")]
            for key in keys:
                assert await cache.store(key, answer())
            assert len(masters_holding(cluster, [key.redis_key("nlpmesh:pc") for key in keys])) > 1
            for key in keys:
                assert await gateway.lookup(key) == answer()  # a plain GET under the gateway's read-only grant
            assert await gateway.lookup(keys[0]) == answer()  # the near tier; its hit flushed to a stats shard
            assert await gateway.lookup(template_key("nobody")) is None
            await until(lambda: _stats_are(cache, hits=8, misses=1, stores=7), what="the hits and misses counted")
            await until(lambda: _subscribers(cluster, "nlpmesh:pc:invalidations") >= 1, timeout_s=10,
                        what="the gateway's subscription")
            assert await cache.invalidate_template("capital") == 6
            await until(lambda: len(gateway) == 0, what="the near tier to drop its copies")
            assert await cache.invalidate_model("m1", tenant="acme") == 1
            await quotas.warm_up()
            admission = await quotas.admit(tenant)
            with pytest.raises(ResourceExhausted):  # refused by the quota script, not by NOPERM or CROSSSLOT
                await quotas.admit(tenant)
            await admission.release()
            return quotas._backoff.failures
        finally:
            await quotas.close()
            await quota_client.aclose()
            await gateway.close()
            await cache.close()

    assert asyncio.run(main()) == 0  # the quotas never fell back to local shares
    blocks = RedisBlocks(url("inference"), key_prefix="nlpmesh:kv", budget_s=2.0)
    try:
        shared = prefix_cache(blocks)
        ids = list(range(100, 100 + 3 * BLOCK + 1))
        keys = shared.keys("acme", ids)
        kv = chain_kv(3 * BLOCK, 0)
        assert blocks.put([(key, kv[:, :, :, i * BLOCK:(i + 1) * BLOCK]) for i, key in enumerate(keys)]).result() == keys
        assert torch.equal(prefix_cache(blocks).match(keys).kv, kv)
    finally:
        blocks.close()
    assert _refused(cluster) == []


def test_a_cluster_that_cannot_be_reached_is_a_miss_an_unavailable_and_a_local_quota_share():
    from tests.conftest import free_port

    url = f"redis+cluster://127.0.0.1:{free_port()}/0"  # nothing listens: redis-py raises its own cluster error
    tenant = Tenant("acme", TenantLimits(requests_per_s=1))

    async def main():
        cache = PromptCache(redis_client(url), prefix="test:down", ttl_s=60, timeout_s=0.5)
        quota_client = redis_client(url)
        quotas = Quotas(quota_client, QuotaSettings(timeout_s=0.5, replicas=1))
        try:
            assert await cache.lookup(template_key()) is None
            assert not await cache.store(template_key(), answer())
            with pytest.raises(Unavailable):
                await cache.invalidate_template("capital")
            with pytest.raises(Unavailable):
                await cache.stats()
            await quotas.admit(tenant)  # admitted on this replica's share, not an error
            with pytest.raises(ResourceExhausted):
                await quotas.admit(tenant)
            return quotas._backoff.failures
        finally:
            await quotas.close()
            await quota_client.aclose()
            await cache.close()

    assert asyncio.run(main()) > 0  # fell back to the local share


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A 3-master cluster serving TLS (client certificates required, TLS on the cluster bus) and the ACL users."""
    folder = tmp_path_factory.mktemp("cluster-tls")
    pki = make_pki(folder / "pki", ("server", "client"))
    users = RedisUsers.make()
    acl_file, _ = write_acl(folder, users, "127.0.0.1", 0)
    with running_redis_cluster(
            "--aclfile", str(acl_file), "--tls-cert-file", str(pki["server"]), "--tls-key-file", str(pki["server.key"]),
            "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "yes",
            auth=("admin", users.passwords["admin"]), tls=True) as running:
        def url(user: str) -> str:
            query = f"?ssl_ca_certs={pki['ca']}&ssl_certfile={pki['client']}&ssl_keyfile={pki['client.key']}"
            return users.url(user, "127.0.0.1", running.tls_ports[0], scheme="rediss+cluster") + query
        yield running, url


def test_the_tiers_work_over_a_tls_cluster_with_the_service_users(tls_cluster):
    cluster, url = tls_cluster
    keys = [template_key(f"tenant-{n}") for n in range(6)]

    async def main():
        cache = PromptCache(redis_client(url("cache")), prefix="nlpmesh:pc", ttl_s=60, timeout_s=2.0)
        gateway = PromptCache(redis_client(url("gateway")), prefix="nlpmesh:pc", ttl_s=60, timeout_s=2.0)
        try:
            for key in keys:
                assert await cache.store(key, answer())
            return [await gateway.lookup(key) for key in keys]
        finally:
            await cache.close()
            await gateway.close()

    assert asyncio.run(main()) == [answer()] * len(keys)
    assert len(masters_holding(cluster, [key.redis_key("nlpmesh:pc") for key in keys])) > 1
    blocks = RedisBlocks(url("inference"), key_prefix="nlpmesh:kv", budget_s=2.0)
    try:
        ids = list(range(200, 200 + 3 * BLOCK + 1))
        chain = prefix_cache(blocks).keys("acme", ids)
        kv = chain_kv(3 * BLOCK, 1)
        assert blocks.put([(key, kv[:, :, :, i * BLOCK:(i + 1) * BLOCK]) for i, key in enumerate(chain)]).result() == chain
        assert torch.equal(prefix_cache(blocks).match(chain).kv, kv)
    finally:
        blocks.close()
    assert _refused(cluster) == []
    # The TLS port refuses a plaintext client: the scheme, not the port, chooses TLS.
    plain = RedisBlocks(url("inference").split("?")[0].replace("rediss+cluster", "redis+cluster"),
                        key_prefix="nlpmesh:kv", budget_s=1.0)
    try:
        assert plain.get(chain) is None and plain.cooling_down
    finally:
        plain.close()


# -- URLs -----------------------------------------------------------------------------------


def test_a_cluster_url_gets_the_cluster_clients_and_is_checked_like_any_other(tmp_path):
    import redis.asyncio as aioredis

    from meshkit.redis_connect import RedisUrlError, check_redis_url, is_cluster_url, redact_url, redis_from_url

    assert is_cluster_url("redis+cluster://a:b@h:7000/0") and is_cluster_url("rediss+cluster://h:7000")
    assert not is_cluster_url("redis://h:6379/0")
    assert isinstance(redis_from_url(aioredis.Redis, "redis://h:6379/0"), aioredis.Redis)
    assert not is_cluster_client(redis_from_url(aioredis.Redis, "redis://h:6379/0"))
    with pytest.raises(RedisUrlError, match="only database 0"):
        check_redis_url("redis+cluster://h:7000/3")
    with pytest.raises(RedisUrlError, match="TLS options on a plaintext URL"):
        check_redis_url(f"redis+cluster://h:7000/0?ssl_ca_certs={tmp_path}")
    with pytest.raises(RedisUrlError, match="no such file"):
        check_redis_url("rediss+cluster://h:7000/0?ssl_ca_certs=/nonexistent/ca.pem")
    with pytest.raises(RedisUrlError, match="unsupported option"):
        check_redis_url("redis+cluster://h:7000/0?cluster_error_retry_attempts=9")
    with pytest.raises(RedisUrlError) as refused:
        check_redis_url("redis+sentinel://gateway:s3cret@h:7000/0")
    assert "s3cret" not in str(refused.value)
    assert redact_url("redis+cluster://gateway:s3cret@h:7000/0") == "redis+cluster://gateway:***@h:7000/0"


def test_answers_served_from_the_near_tier_are_touched_on_every_master(cluster, prefix):
    keys = [template_key(tenant, template) for tenant in TENANTS for template in TEMPLATES[:2]]

    async def main():
        near = NearCache(PromptCache(redis_client(cluster.url), prefix=prefix, ttl_s=600, timeout_s=2.0),
                         max_bytes=1 << 20, max_age_s=600)
        try:
            for key in keys:
                assert await near.backing.store(key, answer())
                assert await near.lookup(key) == answer()  # from Redis, now held in memory
            await asyncio.sleep(2.1)  # Redis's LRU clock counts whole seconds
            for key in keys:
                assert await near.lookup(key) == answer()  # from memory: Redis does not see it
            await near._flush()  # one pipelined TOUCH per key, split by node
        finally:
            await near.close()

    asyncio.run(main())
    client = redis.cluster.RedisCluster.from_url(cluster.url.replace("redis+cluster://", "redis://"))
    try:
        entries = [key.redis_key(prefix) for key in keys]
        assert len({client.keyslot(entry) for entry in entries}) > 1
        assert len({client.get_node_from_key(entry).name for entry in entries}) > 1
        assert all(client.object("idletime", entry) <= 1 for entry in entries)
    finally:
        client.close()
