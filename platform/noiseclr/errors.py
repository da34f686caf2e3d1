"""The errors a user can cause and fix. The CLI prints each as one line on stderr (exit code 2);
anything else is a bug and keeps its traceback. `noiseclr --debug ...` shows the traceback of
these too.

Each message names the file, key or value at fault and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for or gave us (not a bug in the platform)."""


class ConfigError(UserError, ValueError):
    """A job config or option is invalid: unknown key, impossible value, changed on resume."""


class ModelLoadError(UserError, RuntimeError):
    """A base model could not be loaded; the message says why and what to do."""


class BankError(UserError, ValueError):
    """A bank is missing, corrupt, or does not fit the model or request."""


class ImageError(UserError, ValueError):
    """An input image is missing, a folder, not an image, or too large to decode safely."""


class DataError(UserError, ValueError):
    """A data folder is missing, empty, or holds nothing that decodes."""


class EditError(UserError, ValueError):
    """An edit spec is malformed, names an unknown direction, or has a non-finite scale."""


class WorldError(UserError, ValueError):
    """A prompt or factor the shapes world has no word for."""


class StorageError(UserError, OSError):
    """An output path cannot be written as asked (unknown image format, not writable...)."""


class TrackingUnreachable(StorageError):
    """The MLflow server did not answer (refused connection, timeout): not a refusal."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the directions went non-finite; the last good checkpoint was kept."""


class CheckpointError(ConfigError):
    """A checkpoint is unreadable or corrupt (truncated, wrong checksum), or could not be written."""


class Preempted(UserError, RuntimeError):
    """The job was asked to stop (SIGTERM) and stopped at a step boundary with a checkpoint."""


class OutOfMemory(UserError, RuntimeError):
    """A worker ran out of memory (the kernel's or Ray's OOM kill, or the GPU's allocator)."""
