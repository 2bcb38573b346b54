"""Versions this client speaks (docs/protocol.md, "Versions")."""
PROTOCOL_VERSION = 1
CLIENT_NAME = "fedtune-python/0.1.0"
