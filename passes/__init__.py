"""Optimization passes over the attention IR, one file per pass."""
