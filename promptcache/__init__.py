"""The prompt cache as one library, used by the gateway (lookups) and the cache service
(stores, invalidation, stats): key derivation (keys.py), the Redis tier (redis_tier.py),
the in-process near tier (near_tier.py) and their metrics (metrics.py).
"""
