"""Supervision: the state machine and the supervisor that decides start, restart, park and stop."""
