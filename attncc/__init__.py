"""attncc: an attention compiler."""

__version__ = "0.1.0"
