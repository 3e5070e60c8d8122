"""Typed errors of the harness. Every message names the key or the file and says what to do."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class of the harness's errors."""


class HarnessConfigError(HarnessError, ValueError):
    """A run configuration value is unknown, missing, non-finite, out of range or inconsistent."""


class RunFolderError(HarnessError):
    """A run folder cannot be resumed as it is (missing, torn or damaged file); the message names the
    file and the way out."""


class NonFiniteTrainingError(HarnessError):
    """Training stopped because the loss or the gradients kept being NaN / inf; no update reached the weights."""
