"""Readout's demo 3D vision-language model, top to bottom in one file.

Vision: a CT volume resampled to a fixed grid with three HU windows as channels, cut into 3D
patches, plus one geometry token (grid spacing in mm), through a small bidirectional
transformer. Language: a decoder-only transformer over [geometry token, visual tokens (plus the
topic's anatomical region), prompt, answer]. At `schedule_layer` (a quarter of the depth) Photon's
scheduler decides which visual tokens the rest of the model keeps; at inference they are removed
from the sequence and from every layer's KV cache, so later layers and decoding run on fewer
tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engines.scheduler import SurrogateGate, TokenScheduler

Pruning = Literal["off", "soft", "hard", "flip"]
REGIONS = ("lung", "pleura", "heart", "liver", "bone", "body")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int = 256
    heads: int = 8
    encoder_layers: int = 4
    decoder_layers: int = 8
    schedule_layer: int = 2
    max_text: int = 96
    channels: int = 3
    grid: tuple[int, int, int] = (32, 128, 128)
    patch: tuple[int, int, int] = (4, 16, 16)

    @property
    def tokens_per_axis(self) -> tuple[int, int, int]:
        return tuple(g // p for g, p in zip(self.grid, self.patch))  # type: ignore[return-value]

    @property
    def visual_tokens(self) -> int:
        d, h, w = self.tokens_per_axis
        return d * h * w

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """One layer's keys and values in preallocated buffers, so decoding writes in place."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        b, h, t, d = k.shape
        self.k = k.new_zeros(b, h, capacity, d)
        self.v = v.new_zeros(b, h, capacity, d)
        self.k[:, :, :t] = k
        self.v[:, :, :t] = v
        self.length = t

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` (e.g. repeat each topic's prefix for its rollouts)."""
        self.k = self.k[rows]
        self.v = self.v[rows]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend over ``cache`` (if any) plus ``x``; returns the output and x's own keys/values."""
        q, k, v = self.attn.project(self.norm1(x))
        keys, values = (k, v) if cache is None else cache.append(k, v)
        x = x + self.attn.attend(q, keys, values, mask)
        return x + self.mlp(self.norm2(x)), (k, v)


@dataclass
class Prefix:
    """The decoder state after the prompt: per-layer caches, which keys are valid, and the scheduling."""

    caches: list[KVCache]
    key_valid: torch.Tensor  # [B, T] over cached positions
    next_position: torch.Tensor  # [B] text position of the first answer token
    kept: torch.Tensor  # [B] visual tokens kept
    p: torch.Tensor | None  # [B, N] keep probabilities (None when pruning is off)
    logits: torch.Tensor  # [B, V] next-token logits after the prompt (the answer's first token)

    def select(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(rows)
        self.key_valid = self.key_valid[rows]
        self.next_position = self.next_position[rows]
        self.kept = self.kept[rows]
        self.logits = self.logits[rows]


class ReadoutVLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv3d(c.channels, c.dim, kernel_size=c.patch, stride=c.patch)
        self.visual_position = nn.Parameter(torch.zeros(1, c.visual_tokens, c.dim))
        self.geometry = nn.Linear(3, c.dim)
        self.encoder = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.dim)
        self.region = nn.Parameter(torch.zeros(c.dim))
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.text_position = nn.Embedding(c.max_text, c.dim)
        self.decoder = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.decoder_layers))
        self.scheduler = TokenScheduler()
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.head.weight = self.token_embed.weight
        # Small embeddings: the head shares token_embed, and N(0, 1) would start with huge logits.
        for weight in (self.visual_position, self.region, self.token_embed.weight, self.text_position.weight):
            nn.init.normal_(weight, std=0.02)

    # --- vision ---------------------------------------------------------------------------

    def encode(self, image: torch.Tensor, grid_spacing_mm: torch.Tensor) -> torch.Tensor:
        """[B, C, D, H, W] windows + [B, 3] mm per grid cell → [B, 1 + N, dim] (geometry token first)."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2) + self.visual_position
        geometry = self.geometry(torch.log(grid_spacing_mm.float()))[:, None, :].to(x.dtype)
        x = torch.cat([geometry, x], dim=1)
        for block in self.encoder:
            x, _ = block(x, None)
        return self.encoder_norm(x)

    # --- language -------------------------------------------------------------------------

    def _text_embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embed(ids) + self.text_position(positions.clamp(max=self.config.max_text - 1))

    def prefill(self, visual: torch.Tensor, region: torch.Tensor, prompt: torch.Tensor, pruning: Pruning = "hard",
                capacity: int = 0, physical: bool = False) -> Prefix:
        """Run [geometry, visual + region, prompt] through the decoder and schedule the visual tokens.

        Parameters
        ----------
        visual:
            [B, 1 + N, dim] encoder output (one row per sequence).
        region:
            [B, N] share of each visual token inside the prompt's anatomical region.
        prompt:
            [B, P] left-padded prompt ids (0 = padding).
        pruning:
            ``off`` keeps every token; ``soft`` scales visual hidden states by p; ``hard`` drops
            tokens with rho <= theta (surrogate gradient when training); ``flip`` keeps only
            the tokens ``hard`` would drop (Photon's flip regularizer).
        capacity:
            Extra cache slots for the tokens that will follow (answer or decoding).
        physical:
            Remove dropped tokens from the sequence and every cache (inference) instead of
            masking them (training, where the batch must keep one shape).
        """
        c = self.config
        b, n = visual.shape[0], c.visual_tokens
        prompt_valid = prompt != 0
        positions = (prompt_valid.cumsum(-1) - 1).clamp(min=0)
        regioned = visual[:, 1:] + region[..., None].to(visual.dtype) * self.region
        x = torch.cat([visual[:, :1], regioned, self._text_embed(prompt, positions)], dim=1)
        key_valid = torch.cat([torch.ones(b, 1 + n, dtype=torch.bool, device=x.device), prompt_valid], dim=1)
        structure = _structure(1 + n, x.shape[1], x.device)

        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
        p = None
        for i, block in enumerate(self.decoder):
            if i == c.schedule_layer and pruning != "off":
                q, k, _ = block.attn.project(block.norm1(x))
                _, _, p = self.scheduler(q[:, :, 1 + n :], k[:, :, 1 + n :], k[:, :, 1 : 1 + n], prompt_valid)
                keep = p > 0.5  # the same as rho > theta
                if pruning == "flip":
                    keep = ~keep
                if pruning == "soft":
                    x = torch.cat([x[:, :1], x[:, 1 : 1 + n] * p[..., None].to(x.dtype), x[:, 1 + n :]], dim=1)
                    keep = torch.ones_like(keep)
                elif self.training:
                    gated = SurrogateGate.apply(x[:, 1 : 1 + n], p, keep)
                    x = torch.cat([x[:, :1], gated, x[:, 1 + n :]], dim=1)
                key_valid = key_valid.clone()
                key_valid[:, 1 : 1 + n] = keep
                if physical:
                    order = _kept_order(keep, x.shape[1])
                    x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
                    key_valid = torch.gather(key_valid, 1, order)
                    kv = [(_gather_cache(k, order), _gather_cache(v, order)) for k, v in kv]
                    structure = _structure(x.shape[1] - prompt.shape[1], x.shape[1], x.device)
            mask = structure[None, None] & key_valid[:, None, None, :]
            x, layer_kv = block(x, mask)
            kv.append(layer_kv)
        caches = [KVCache(k, v, k.shape[2] + capacity) for k, v in kv]
        logits = self.head(self.norm(x[:, -1]))  # prompts are left-padded: the last slot is real
        return Prefix(caches, key_valid, prompt_valid.sum(-1), keep.sum(-1), p, logits)

    def extend(self, prefix: Prefix, ids: torch.Tensor) -> torch.Tensor:
        """Run new tokens [B, A] over the prefix caches (appending to them); returns logits [B, A, V]."""
        b, a = ids.shape
        positions = prefix.next_position[:, None] + torch.arange(a, device=ids.device)
        x = self._text_embed(ids, positions)
        cached = prefix.caches[0].length
        causal = torch.ones(a, a, dtype=torch.bool, device=ids.device).tril()
        mask = torch.cat([prefix.key_valid[:, None, :].expand(b, a, cached), causal.expand(b, a, a)], dim=-1)
        for block, cache in zip(self.decoder, prefix.caches):
            x, _ = block(x, mask[:, None], cache)
        prefix.key_valid = torch.cat([prefix.key_valid, torch.ones(b, a, dtype=torch.bool, device=ids.device)], dim=1)
        prefix.next_position = prefix.next_position + a
        return self.head(self.norm(x))

    def forward(self, visual: torch.Tensor, region: torch.Tensor, prompt: torch.Tensor, answer: torch.Tensor,
                pruning: Pruning = "hard") -> tuple[torch.Tensor, Prefix]:
        """Teacher-forced logits [B, A, V] predicting each token of ``answer`` [B, A]."""
        prefix = self.prefill(visual, region, prompt, pruning, capacity=answer.shape[1])
        first = prefix.logits[:, None]
        if answer.shape[1] == 1:
            return first, prefix
        return torch.cat([first, self.extend(prefix, answer[:, :-1])], dim=1), prefix


def _structure(visual_slots: int, length: int, device: torch.device) -> torch.Tensor:
    """[T, T] allowed attention: the first ``visual_slots`` see each other both ways, text is causal."""
    is_text = torch.arange(length, device=device) >= visual_slots
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return (~is_text[None, :] & ~is_text[:, None]) | (causal & is_text[:, None])


def _kept_order(keep: torch.Tensor, length: int) -> torch.Tensor:
    """Sequence positions after removing dropped visual tokens, padded to the longest kept count.

    Kept tokens move to the front of the visual block (original order, so each keeps its own
    position embedding); rows with fewer kept tokens carry dropped ones as masked padding.
    """
    b, n = keep.shape
    longest = int(keep.sum(-1).max())
    visual = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :longest] + 1
    head = torch.zeros(b, 1, dtype=torch.long, device=keep.device)
    tail = torch.arange(1 + n, length, device=keep.device).expand(b, -1)
    return torch.cat([head, visual, tail], dim=1)


def _gather_cache(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Select sequence positions ``order`` [B, T'] of a [B, H, T, d] key or value tensor."""
    return torch.gather(t, 2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
