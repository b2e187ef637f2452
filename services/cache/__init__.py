"""The exact-match prompt cache: key derivation (keys.py), the Redis store (store.py), the service.

Nothing heavy is imported here: the gateway imports ``services.cache.keys`` and
``services.cache.store`` directly.
"""
