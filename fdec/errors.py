"""Errors fdec reports to users: one line naming the problem and the fix, with an exit code."""

from __future__ import annotations

__all__ = [
    "EXIT_DOES_NOT_FIT",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_QUALITY_GATE",
    "EXIT_USAGE",
    "BusyError",
    "CompileError",
    "FdecError",
    "InputError",
    "UsageError",
    "VerificationError",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # compile or verification failure
EXIT_USAGE = 2  # bad input or options: nothing was built
EXIT_QUALITY_GATE = 3  # a lossy build missed its quality gate: nothing was written
EXIT_DOES_NOT_FIT = 4  # the model × batch × context would not fit the target's memory


class FdecError(Exception):
    """An error meant for the user: `problem` says what is wrong, `fix` what to do about it."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, problem: str, fix: str | None = None, *, exit_code: int | None = None):
        self.problem = problem
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class UsageError(FdecError):
    """Wrong options or an unknown name on the command line."""

    exit_code = EXIT_USAGE


class InputError(FdecError):
    """The model, target or data given cannot be used as it is."""

    exit_code = EXIT_USAGE


class CompileError(FdecError):
    """A pass or lowering step failed on valid input."""

    exit_code = EXIT_FAILURE


class VerificationError(FdecError):
    """The build does not match the source model within the declared tolerance."""

    exit_code = EXIT_FAILURE


class BusyError(FdecError):
    """Another fdec process holds what this one needs (the build folder) and we may not wait."""

    exit_code = EXIT_FAILURE


class CapacityError(FdecError):
    """The asked batch × context (or the weights alone) cannot fit the target's memory."""

    exit_code = EXIT_DOES_NOT_FIT


class QualityGateError(FdecError):
    """A lossy build missed its quality gate (--max-ppl-increase): exit code 3.

    `details` is what CI needs to act on it (the gate, the figures, the most sensitive layers);
    `fdec compile --json` prints it as the outcome's "gate" object.
    """

    exit_code = EXIT_QUALITY_GATE

    def __init__(self, problem: str, fix: str | None = None, *, details: dict | None = None):
        super().__init__(problem, fix)
        self.details = details or {}
