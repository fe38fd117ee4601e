"""minikv's kernels. Placeholder dispatch: the reference path until the Triton kernels land."""

from .reference import attend_score_sample, prefill_attention  # noqa: F401
