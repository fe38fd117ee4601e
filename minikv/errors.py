"""Errors a user can act on.

Every error minikv raises on purpose derives from `MiniKVError`; its message says what was wrong and how
to fix it. The CLI prints these messages without a traceback; anything else is a bug and keeps its trace.
"""


class MiniKVError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug in minikv."""


class ModelLoadError(MiniKVError):
    """The model could not be found, read or understood (path, files, architecture, tensor types)."""


class ConfigError(MiniKVError, ValueError):
    """An engine or policy setting is invalid (budget, chunk, policy name, dtype, device)."""


class InvalidRequestError(MiniKVError, ValueError):
    """One request is invalid (empty prompt, bad sampling parameter); the engine keeps serving others."""


class SessionFileError(MiniKVError):
    """A session file could not be written or read back (unwritable directory, truncated or corrupt file,
    or a file made by another model, policy, block size or dtype): see minikv.session."""
