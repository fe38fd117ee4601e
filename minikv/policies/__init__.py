"""Eviction policies: each a small dataclass with one scoring rule (see base.Policy)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Policy, PrefillCandidates
from .baselines import H2O, TOVA, Full, KeyDiff, SnapKV, Streaming
from .epikv import EpiKV, EpiKVLag
from .nestedkv import NestedKV
from .nexus import Nexus

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Nexus, Full, Streaming, H2O, TOVA, SnapKV, KeyDiff,
                                                               EpiKV, EpiKVLag, NestedKV)}


def make_policy(name: str | Policy, **options) -> Policy:
    """A policy by name (`nexus`, `h2o`, ...); options are its dataclass fields (n_sink, window, gamma...)."""
    if isinstance(name, Policy):
        return name
    cls = POLICIES.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"bad option for policy {name!r}: {err}") from None


__all__ = ["POLICIES", "Policy", "PrefillCandidates", "make_policy"]
