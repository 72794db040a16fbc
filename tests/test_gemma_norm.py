"""Gemma 3's RMSNorm through torch's fused rms_norm (engines/gemma_norm.py) against transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from engines.gemma_norm import FusedGemmaRMSNorm, fuse_rms_norms
from tests.tiny_gemma import build_tiny_model, build_tokenizer


def _random_norm(dim: int, dtype: torch.dtype, seed: int = 0) -> Gemma3RMSNorm:
    norm = Gemma3RMSNorm(dim, eps=1e-6).to(dtype)
    with torch.no_grad():  # Gemma starts its norms at zero (a scale of 1); trained ones are not
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return norm


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_the_fused_norm_computes_gemmas_norm(dtype, tolerance):
    norm = _random_norm(256, dtype)
    x = (torch.randn(3, 2, 5, 256, generator=torch.Generator().manual_seed(1)) * 30).to(dtype)
    fused = FusedGemmaRMSNorm(norm)(x)
    assert fused.dtype == dtype and fused.shape == x.shape
    torch.testing.assert_close(fused.float(), norm(x).float(), atol=tolerance, rtol=tolerance)


def test_every_norm_of_a_gemma_model_is_replaced_and_its_output_kept():
    model = build_tiny_model(build_tokenizer())
    text = model.config.text_config
    for module in model.modules():
        if isinstance(module, Gemma3RMSNorm):
            module.weight.data.normal_(0.0, 0.5)
    keys = list(model.state_dict())
    ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        replaced = fuse_rms_norms(model)
        after = model(input_ids=ids).logits
    # Six per decoder layer (around attention and MLP, on queries and keys), the final one, the projector's.
    assert replaced == 6 * text.num_hidden_layers + 2
    assert not any(isinstance(m, Gemma3RMSNorm) for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
