"""User-facing errors: one line, naming the file or config key, non-zero exit from the CLI."""

from __future__ import annotations


class SemisegError(Exception):
    """An error caused by user input (config, data, paths). The CLI prints it on one line and exits 2."""


class ConfigError(SemisegError):
    """Unknown key, wrong type or bad value in a config; the message names the dotted key."""


class DataError(SemisegError):
    """Missing, unreadable or inconsistent data; the message names the file."""


class TrainingError(SemisegError):
    """Training cannot go on (NaN loss, existing run directory, ...)."""


class RegistryError(SemisegError):
    """A name registered twice (methods, plug-ins, datasets, ...), or an entry point that cannot be
    loaded; the message names the objects and, for an entry point, its distribution."""


class OutputExistsError(DataError):
    """An output that exists and is not replaced without the caller's consent. The message names the
    consent as the caller gives it: ``overwrite=True`` in Python; the CLI re-words it as ``--overwrite``
    (:meth:`for_cli`)."""

    def __init__(self, path: object, what: str = "exists", option: str = "overwrite=True") -> None:
        self.path, self.what, self.option = path, what, option
        super().__init__(f"{path}: {what} (pass {option} to replace it)")

    def for_cli(self) -> OutputExistsError:
        """The same error worded for the command line (``--overwrite``)."""
        return OutputExistsError(self.path, self.what, "--overwrite")
