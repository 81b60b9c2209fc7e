"""Named exceptions of the pipeline.

Jobs turn :class:`InputError` into exit code 2 (the user gave something wrong) and every
other :class:`PipelineError` into exit code 1 (the run failed). Messages are one line and
say what was expected and what arrived.
"""


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    exit_code = 1


class InputError(PipelineError, ValueError):
    """The user's input (a file, an option, a configuration) is not acceptable.

    Also a ``ValueError``, so code that calls the library can catch it as such."""

    exit_code = 2


class IdxFormatError(InputError):
    """An idx file does not follow the idx format."""


class DatasetMismatchError(InputError):
    """Image and label files do not belong together (counts, ranges, shapes)."""


class ChecksumError(PipelineError):
    """Downloaded or stored content does not have the expected checksum."""


class FetchError(PipelineError):
    """A file could not be obtained from any source."""


class StoreError(InputError):
    """A zarr store or parquet dataset is missing or not what the stage expects."""


class ConfigMismatchError(InputError):
    """Features were made with another feature configuration than the model expects."""


class ArtifactError(InputError):
    """A model artifact is missing, tampered with or of an unknown version."""


class LockError(PipelineError):
    """Another run holds the lock on the same output."""


class ClusterError(PipelineError):
    """The processes running the tasks failed: a cluster that could not be started or did
    not deliver its workers (SLURM, dask), a dask scheduler that cannot be reached, a
    cluster left without workers, workers killed while running a task (often for memory),
    or a local worker process that died."""


class DigitNotFoundError(InputError):
    """A picture holds no usable digit: blank, only specks, several digits, or pixels that
    are not numbers (NaN/inf). Raised by the normalization kernels (no file name)."""
