"""The gateway: listener, health endpoints, the authenticated proxy, keys, control socket,
metrics."""
