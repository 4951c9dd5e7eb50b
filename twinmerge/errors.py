"""Errors with one-line messages that name the file (or expert/tensor) and the problem."""


class TwinMergeError(ValueError):
    """Base class of every error a user can fix by changing inputs or options."""


class CheckpointError(TwinMergeError):
    """A checkpoint folder or file is missing, unsafe, incompatible with the base, or corrupt."""


class MergeError(TwinMergeError):
    """Unknown merge method or invalid merge options."""


class FactorError(TwinMergeError):
    """An exclusive-knowledge factor file is malformed or does not match the shared model."""


class SourceError(TwinMergeError):
    """A data or model source (package registry, Hub) could not be obtained."""


class InputError(TwinMergeError):
    """Texts or options given to inference (`twinmerge predict`, `TwinBundle.predict`) are unusable."""
