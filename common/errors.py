"""Errors with one-line messages meant for a person, not a traceback."""


class FedradError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class ImageReadError(FedradError):
    """One image could not be used; the reason is counted and reported, never fatal."""


class DataError(FedradError):
    """A data source as a whole is unusable (missing path, no usable images, ...)."""
