"""Logs: JSON-lines files, events, server output, request records, sealing, verification, tail."""
