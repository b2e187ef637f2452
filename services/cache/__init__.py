"""The cache service: stores, invalidation and stats over the promptcache library."""
