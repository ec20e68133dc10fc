"""Errors a user can cause. The CLI turns each into one readable line and its exit code."""


class KolmError(Exception):
    """A user mistake (bad flag, bad file, bad input): exit 2, nothing written."""

    exit_code = 2


class GateError(KolmError):
    """The compiled model's K-score is below the recipe's floor: exit 3, no artifact written."""

    exit_code = 3


class ArtifactError(KolmError):
    """A .kolm file is tampered, truncated, wrongly keyed or not an artifact: exit 4."""

    exit_code = 4
