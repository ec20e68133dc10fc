"""Errors a user can cause. The CLI turns each into one readable line and its exit code."""

from __future__ import annotations

import argparse


class KolmError(Exception):
    """A user mistake (bad flag, bad file, bad input): exit 2, nothing written."""

    exit_code = 2


class GateError(KolmError):
    """The compiled model's K-score is below the recipe's floor: exit 3, no artifact written."""

    exit_code = 3


class ArtifactError(KolmError):
    """A .kolm file is tampered, truncated, wrongly keyed or not an artifact: exit 4."""

    exit_code = 4


class UsageError(KolmError):
    """argparse's complaint about the command line (an unknown flag, `--epochs abc`): exit 2, one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse without the usage block: a bad command line raises UsageError, which the CLI prints as one
    line `error: kolm compile: argument --epochs: invalid int value: 'abc'` (exit 2). --help is unchanged."""

    def error(self, message: str):  # argparse's own: print usage + message to stderr, then exit(2)
        raise UsageError(f"{self.prog}: {message}")


def read_json_file(path, label: str | None = None):
    """A user's JSON file, or a KolmError naming it (`label`, default the path): missing or not JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    label = label or str(path)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise KolmError(f"{label}: no such file") from None
    except json.JSONDecodeError as e:
        raise KolmError(f"{label}: not JSON ({e.msg} at line {e.lineno})") from None
