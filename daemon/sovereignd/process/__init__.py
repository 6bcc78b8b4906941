"""The model server's process tree: spawning, signalling, exits, failures, probes and progress."""
