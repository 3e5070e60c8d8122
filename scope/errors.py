"""Typed errors raised by SCOPE. Every message names the argument and the rule it broke."""

from __future__ import annotations


class ScopeError(ValueError):
    """Base class of SCOPE's errors."""


class ScopeConfigError(ScopeError):
    """A configuration value is missing, unknown, out of its valid range, or combined with another
    value in a way the contract forbids (e.g. ``bias_impl="qk_aug"`` with a ramp)."""


class ScopeInputError(ScopeError):
    """A tensor or argument passed to a SCOPE op or module breaks a documented rule."""
