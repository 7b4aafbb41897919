"""Exceptions that santa raises for problems the user can fix.

Every message says what went wrong and, where possible, what to do next. Front ends map these
classes to exit codes in one place (``cli.main``); the library never prints or exits.
"""

from __future__ import annotations


class SantaError(Exception):
    """Base class: a problem with the user's input, model or environment (not a bug)."""

    exit_code = 1


class UsageError(SantaError):
    """Bad arguments or options: an invalid value, a malformed cursor spec, a missing marker."""

    exit_code = 2


class InputError(SantaError):
    """The user's file or stdin cannot be used (missing, binary, not UTF-8, empty)."""

    exit_code = 3


class ConfigError(SantaError):
    """A checkpoint's config.json is missing, malformed or describes an unsupported model."""

    exit_code = 4


class ModelNotFoundError(SantaError):
    """A model id or alias could not be resolved, locally or on the hub."""

    exit_code = 4


class CheckpointError(SantaError):
    """Weights are missing, corrupted, mis-shaped or in a format santa does not load."""

    exit_code = 4


class BackendError(SantaError):
    """An attention backend, device or dtype was requested that cannot run here."""

    exit_code = 5


class ContextLengthError(SantaError):
    """The prompt plus the requested output does not fit in the model's context."""

    exit_code = 2


class RemoteError(SantaError):
    """A completion server (``--endpoint``) cannot be reached, refused the request or failed."""

    exit_code = 6
