"""The exception root of interest-stream; every error meant for a user derives from it."""


class InterestStreamError(Exception):
    """Root of every error interest-stream raises on purpose (printed as one line, no traceback)."""


class DataError(InterestStreamError):
    """An input data file is malformed or does not match its format."""


class ModelError(InterestStreamError):
    """A model file or checkpoint is missing, corrupt or does not match what it is used with."""


class ConfigError(InterestStreamError):
    """A setting or command-line option is invalid."""


class ServiceError(InterestStreamError):
    """A local service (broker, Redis) could not be started, reached or stopped."""
