"""Integrity: weights manifests and signatures, software baselines, hashing and the drift
monitor."""
