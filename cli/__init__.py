"""The `nlpmesh` command line: up, down, ask, health, demo."""
