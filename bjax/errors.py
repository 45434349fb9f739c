"""Exceptions raised by bjax at trace time.

Every message names the argument, what was expected and what was given.
"""


class BjaxError(Exception):
    """Base class of every error bjax raises on purpose."""


class InvalidProblemError(BjaxError, ValueError):
    """The problem is malformed: shapes, axes or options that do not fit together."""


class UnsupportedError(BjaxError, NotImplementedError):
    """The problem is well formed but outside what bjax implements (dtype, backend, ...)."""


class TuningCacheError(BjaxError, ValueError):
    """A tuning cache file (``bjax.tune``) that cannot be read: not JSON, another format,
    or a config type outside ``pallas_kernels``."""
