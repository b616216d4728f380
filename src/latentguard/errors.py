"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (config, data, layer name, checkpoint); never a bug in latentguard."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or impossible."""


class DataError(UserError):
    """A data file or package is missing or malformed."""


class SiteError(UserError):
    """A perturbation site cannot be resolved or holds no tensor to perturb."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, corrupted or unsafe."""


class NonFiniteError(UserError):
    """A loss, gradient or perturbation became NaN or infinite."""
