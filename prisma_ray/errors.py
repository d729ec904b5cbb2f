"""The project's own error types: what `prisma-ray` reports in one line instead of a traceback.

Every error that a user's input can cause (a config, a path, a model or hook name, a dataset, a
checkpoint) derives from `PrismaRayError`; anything else is a bug and keeps its traceback.
"""


class PrismaRayError(Exception):
    """An input that prisma-ray cannot use; the message names the input and says what to do."""


class InvalidRequest(PrismaRayError, ValueError):
    """A request that cannot be carried out as asked (values out of range, a model/dataset mismatch, ...)."""
