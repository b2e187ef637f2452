"""The runtime every nlpmesh process shares: settings, errors, server, shutdown.

Written once, used by the gateway and the four internal services.
"""
