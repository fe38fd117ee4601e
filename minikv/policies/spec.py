"""Policies written as text: ``name`` or ``name:key=value,...`` (``nexus:tau=0``, ``nexus:reserve=0``).

Both ``minikv run --policy`` and ``minikv eval --policies`` take this form, so an ablation measured by the
eval can be run by hand with the same string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class PolicySpec:
    """A policy with options, written ``name`` or ``name:key=value,key=value`` (e.g. ``nexus:tau=0``)."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_policy(text: str) -> PolicySpec:
    """Parse ``nexus:gamma=0,tau=0.5`` into a PolicySpec; values are read as int, float or bool."""
    from . import POLICIES

    name, _, option_text = text.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r} in {text!r}; known policies: {', '.join(POLICIES)}")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in option_text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"policy option {item!r} in {text!r} must look like key=value (e.g. nexus:tau=0)")
        if key.strip() in options:
            raise ConfigError(f"policy option {key.strip()!r} is given twice in {text!r}")
        options[key.strip()] = _parse_value(value.strip())
    _check_policy_options(name, options, text)
    return PolicySpec(text.strip(), name, options)


def _parse_value(value: str) -> Any:
    """`true`/`false` -> bool, `none` -> None, then int, then float; anything else stays text (and the
    policy's type check says what it should have been)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _check_policy_options(name: str, options: dict[str, Any], text: str) -> None:
    """Build the policy once so that a misspelt option fails before any model is loaded."""
    from . import make_policy

    reserved = {"n_sink", "window"} & set(options)
    if reserved:
        raise ConfigError(f"set {', '.join(sorted(reserved))} with --n-sink/--window, not in the policy {text!r}")
    make_policy(name, **options)
