"""Gemma 3's RMSNorm through torch's fused ``rms_norm``: three kernels a call instead of ten.

``transformers``' ``Gemma3RMSNorm`` computes ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32,
one elementwise kernel per operation, and casts its weight on every call. Gemma 3 has six norms a
decoder layer, so in a decode step (one token per row) they were two thirds of the step's 3,151
kernels on an H200; the kernels whose call counts match theirs (205 or 410 a step) took about
3.4 ms of its 14.6 ms (bench/RESULTS.md, profile at d452cab). The same formula through
``torch.nn.functional.rms_norm`` (a fused kernel on CUDA), with ``1 + w`` kept in float32, is one
cast in, one kernel, one cast out.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm


class FusedGemmaRMSNorm(torch.nn.Module):
    """A drop-in for one ``Gemma3RMSNorm``: the same parameter, ``1 + w`` precomputed in float32.

    ``scale`` is derived from the weight when the module is made, so make it from loaded weights
    (`fuse_rms_norms` is called once a model is loaded) and remake it if they change.
    """

    def __init__(self, norm: Gemma3RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight  # the same parameter: state dicts keep their keys
        self.eps = norm.eps
        self.register_buffer("scale", 1.0 + norm.weight.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.scale.shape, self.scale, self.eps).to(x.dtype)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace every ``Gemma3RMSNorm`` in ``model`` by a `FusedGemmaRMSNorm`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Gemma3RMSNorm):
                setattr(parent, name, FusedGemmaRMSNorm(child))
                replaced += 1
    return replaced
