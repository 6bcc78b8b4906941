"""sovereignd: run a local LLM server as a supervised, audited production service."""

__version__ = "0.1.0"
