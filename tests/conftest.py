"""Fixtures shared across test modules."""

# The session's real venv (built once, copied per test) is used by the environment and baseline
# tests; registering the module as a plugin makes it one fixture, not one per importing module.
pytest_plugins = ("pyenvs",)
