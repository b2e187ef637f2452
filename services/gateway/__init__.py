"""The gateway: the public API (shared/API.md), the order of hops, streaming to the caller."""
