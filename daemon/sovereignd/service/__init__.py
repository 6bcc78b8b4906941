"""The daemon as a service: launchd/systemd units, host guard rails and facts, `check`, upgrade."""
