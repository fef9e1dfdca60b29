"""Frontends: user callables (torch.fx), TOML spec files and AttentionSpec, all to the IR."""
