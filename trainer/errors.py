"""Failures the operator can classify: each carries its `api.contract.ExitCode` and a one-line message."""

from __future__ import annotations

from kubesloth.api.contract import ExitCode


class TrainerFailure(Exception):
    """A failure with a known exit code; `str(e)` is the message the operator shows."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadConfig(TrainerFailure):
    exit_code = ExitCode.BAD_CONFIG


class SourceNotFound(TrainerFailure):
    exit_code = ExitCode.SOURCE_NOT_FOUND


class OutputUnwritable(TrainerFailure):
    exit_code = ExitCode.OUTPUT_UNWRITABLE


class OutOfMemory(TrainerFailure):
    exit_code = ExitCode.OUT_OF_MEMORY


class Interrupted(TrainerFailure):
    exit_code = ExitCode.INTERRUPTED


class OutputInUse(TrainerFailure):
    """The output holds another run's checkpoints or model, or another trainer holds its lock."""

    exit_code = ExitCode.OUTPUT_IN_USE
