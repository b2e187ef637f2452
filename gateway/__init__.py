"""The gateway: the public API (docs/api.md), the order of hops, streaming to the caller."""
