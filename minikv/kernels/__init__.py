"""minikv's kernels and the choice between their two implementations (docs/design.md, section 3).

`attend_score_sample` and `prefill_attention` take the reference's arguments and run the Triton kernel on
CUDA tensors, the torch reference on CPU tensors. The environment variable MINIKV_KERNELS overrides it:

  MINIKV_KERNELS=reference   always the torch reference;
  MINIKV_KERNELS=triton      always Triton; CPU tensors then need TRITON_INTERPRET=1 (the interpreter);
  unset / "" / "auto"        by device, as above.

Triton is optional: without it the reference path still works. Under the interpreter, TRITON_INTERPRET=1
must be set before minikv.kernels is first imported (Triton reads it when the kernels are defined).

Note: the submodule `attend_score_sample` shares its name with the dispatch function defined here, and the
function wins; reach the module with `importlib.import_module("minikv.kernels.attend_score_sample")` or
`from minikv.kernels.attend_score_sample import attend_score_sample_triton`.
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from .common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    POSITION_MODES,
    EvictionSpec,
    PoolLayer,
    Rope,
    physical_rows,
)
from . import reference
from .reference import PrefillResult

try:  # imported before the functions below are defined, so the functions keep the package's names
    from . import attend_score_sample as _decode_triton
    from . import prefill as _prefill_triton
except ImportError:  # no Triton: only the reference path is available
    _decode_triton = _prefill_triton = None

__all__ = [
    "attend_score_sample", "prefill_attention", "kernel_backend", "PrefillResult", "PoolLayer", "physical_rows",
    "EvictionSpec", "Rope", "POSITION_MODES", "SCORE_NONE", "SCORE_ATTN", "SCORE_KEYDIFF", "SCORE_EXTERNAL", "VICTIM_OLDEST",
    "VICTIM_MIN_SCORE", "VICTIM_RESERVOIR",
]

_BACKENDS = ("auto", "triton", "reference")


def kernel_backend(device: torch.device | str) -> str:
    """"triton" or "reference": the implementation that runs for tensors on `device`."""
    device = torch.device(device)
    choice = os.environ.get("MINIKV_KERNELS", "").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ConfigError(f"MINIKV_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}; "
                          "unset it to choose by device")
    if choice == "reference":
        return "reference"
    if choice == "triton" or device.type == "cuda":
        if _decode_triton is None:
            raise ConfigError("the Triton kernels need the `triton` package: install it, or set "
                              "MINIKV_KERNELS=reference")
    if choice == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"MINIKV_KERNELS=triton with tensors on {device} needs TRITON_INTERPRET=1 "
                              "(the Triton interpreter); or use a CUDA device, or MINIKV_KERNELS=reference")
        return "triton"
    return "triton" if device.type == "cuda" else "reference"


def attend_score_sample(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pool: PoolLayer,
    block_tables: torch.Tensor,
    filled: torch.Tensor,
    budget: torch.Tensor,
    new_pos: torch.Tensor,
    spec: EvictionSpec,
    *,
    layer: int,
    seed: int,
    scale: float,
    new_score: torch.Tensor | None = None,
    rope: Rope | None = None,
    q_pos: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one layer (see reference.attend_score_sample), on the backend of q's device."""
    if kernel_backend(q.device) == "triton":
        run = _decode_triton.attend_score_sample_triton
    else:
        run = reference.attend_score_sample
    return run(q, k_new, v_new, pool, block_tables, filled, budget, new_pos, spec, layer=layer, seed=seed,
               scale=scale, new_score=new_score, rope=rope, q_pos=q_pos, ring=ring)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: PoolLayer,
    block_table: torch.Tensor,
    filled: int,
    chunk_pos: torch.Tensor,
    *,
    scale: float,
    n_sink: int = 4,
    top_m: int = 0,
    obs_rows: int = 0,
    rope: Rope | None = None,
    rope_pos: torch.Tensor | None = None,
) -> PrefillResult:
    """Causal attention of a prefill chunk over ring + chunk with column mass (see
    reference.prefill_attention), on the backend of q's device."""
    if kernel_backend(q.device) == "triton":
        run = _prefill_triton.prefill_attention_triton
    else:
        run = reference.prefill_attention
    return run(q, k, v, pool, block_table, filled, chunk_pos, scale=scale, n_sink=n_sink, top_m=top_m,
               obs_rows=obs_rows, rope=rope, rope_pos=rope_pos)


def fused_ops_on(x: torch.Tensor) -> bool:
    """The fused RMSNorm / SiLU-mul kernels pay off on a GPU only; elsewhere the model uses torch."""
    return x.is_cuda and ops is not None and kernel_backend(x.device) == "triton"


try:
    from . import ops
except ImportError:  # no Triton
    ops = None
