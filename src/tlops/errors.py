"""User-facing errors. Every message names the thing that is wrong and how to fix it."""


class TlopsError(Exception):
    """Base class for errors that are shown to the user without a traceback."""


class ConfigError(TlopsError):
    """The pipeline configuration is invalid."""


class DataError(TlopsError):
    """The input data cannot be ingested."""


class ModelError(TlopsError):
    """The source model cannot be resolved or loaded."""


class ArtifactError(TlopsError):
    """A step artifact is missing, incomplete or of the wrong kind."""


class StorageError(TlopsError):
    """A local or S3 storage operation failed (names the operation, the URI and the endpoint)."""
