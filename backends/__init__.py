"""Backends that lower the IR to source code."""
