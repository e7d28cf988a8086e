"""Foundations: what every other layer may import, and which imports nothing of ours above it."""
