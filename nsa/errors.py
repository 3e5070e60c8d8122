"""Typed errors raised by the library. Every message names the argument and the rule it broke."""

from __future__ import annotations


class NSAError(ValueError):
    """Base class of the library's errors."""


class NSAInputError(NSAError):
    """A tensor or argument passed to an op or module breaks a documented rule."""


class NSAConfigError(NSAError):
    """A configuration value is missing, unknown or out of its valid range."""
