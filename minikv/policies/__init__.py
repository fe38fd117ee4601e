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
    unknown = sorted(set(options) - set(cls.option_fields()))
    if unknown:
        raise ConfigError(f"bad option for policy {cls.name!r}: it has no option {unknown[0]!r}; "
                          f"{cls.describe_options()}")
    return cls(**options)  # the types and ranges are checked by the policy's __post_init__


__all__ = ["POLICIES", "Policy", "PrefillCandidates", "make_policy"]
