"""The errors a user can cause. Each message names the field, the value and what is allowed."""


class AttnccError(Exception):
    """Base class of every error attncc raises on purpose."""


class SpecError(AttnccError, ValueError):
    """An AttentionSpec field, or a TOML spec file, is invalid."""


class ModError(AttnccError, TypeError):
    """A score_mod / mask_mod, or a spec expression, uses a construct attncc cannot compile."""


class InputError(AttnccError, ValueError):
    """A call-time tensor does not match the compiled program."""


class BackendError(AttnccError, ValueError):
    """An unknown backend, or one that cannot run here."""


class IRError(AttnccError):
    """The IR verifier found a malformed graph (a bug in a pass or a frontend)."""


class ValidationError(AttnccError):
    """A compiled program disagrees with the reference interpreter."""
