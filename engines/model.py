"""Readout's demo 3D vision-language model, top to bottom in one file.

Vision: a CT volume resampled to a fixed grid with three HU windows (of each cell's sample, and of
its highest and lowest HU), five rough anatomy masks from HU, the holes that lesions leave in
three of them, three density classes (gas, dense bone islands, fluid) and three round-spot filters
(bright in lung, dark in soft tissue and bone, bright in bone) as channels, cut into 3D
patches by a convolutional stem of overlapping strided convolutions (so a token can say where
inside it a small lesion sits), with per-axis position embeddings, plus one geometry token (grid
spacing in mm), through a small bidirectional transformer. A finding head reads the stem's
stages, a few convolutions over its second stage with the encoded tokens as context, two
read-outs of the input itself (one for the lung lesion maps), and the encoded tokens into dense maps at half the
grid's in-plane resolution, one per finding type;
it is trained on the phantoms' finding maps, voxel by voxel, which teaches the stem to see
lesions far sooner than token-level labels do.

Language: a decoder-only transformer over [geometry token, visual tokens, prompt, answer]. Text
is causal and sees every (kept) visual token; a visual token sees only itself. The encoder has
already put the volume in context, and this mask makes the visual tokens' keys and values
independent of the prompt: they are computed once per volume and shared by every topic,
question and rollout (training and inference both gain several times over). The topic's
anatomical region enters each layer as learnt key and value offsets on the visual tokens inside
it (LLaVA-TA's anatomy awareness, weighted by the share of the token in the region), and so does
the finding map of the prompt's topic (each token's highest finding probability), which shows
the decoder where to look.

At `schedule_layer` (a quarter of the depth) Photon's scheduler decides which visual tokens the
rest of the model keeps; at inference they are removed from the sequence and from every layer's
KV cache, so later layers and decoding run on fewer tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engines.preprocess import CHANNELS
from engines.prompts import MAP_TOPICS, MAP_TYPES
from engines.scheduler import SurrogateGate, TokenScheduler

Pruning = Literal["off", "soft", "hard", "flip"]


REFINE_WIDTH, REFINE_CONTEXT = 32, 16  # channels of the finding maps' deeper read-out
FINE_WIDTH = 16  # channels of the finding maps' read-out of the input itself, at the finding grid
# The lung lesion maps have a read-out of the input of their own (`finding_lesions`), so that what it
# learns from the round-spot channels cannot move the other maps: on phantoms 8100-8159, training the
# shared read-out on them lit 21 of 24 nodules >= 8 mm (12 before) but cost the pneumothorax,
# pericardial effusion and liver lesion maps.
LESION_TYPES = ("nodule", "mass")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int = 128
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 8
    schedule_layer: int = 2
    max_text: int = 96
    channels: int = CHANNELS  # HU windows of cells, their highest and lowest; anatomy masks, holes, densities, spots
    grid: tuple[int, int, int] = (32, 128, 128)
    patch: tuple[int, int, int] = (4, 16, 16)
    stem_channels: int = 16
    map_topics: tuple[int, ...] = MAP_TOPICS  # finding maps, one per finding type: the report topic of each
    lesion_maps: tuple[int, ...] = tuple(MAP_TYPES.index(kind) for kind in LESION_TYPES)  # `finding_lesions`' maps
    # The saliency quantile that rho's min-max takes as its maximum (`engines.scheduler.min_max`);
    # weights trained before this field carry 1.0, the plain maximum.
    saliency_top_quantile: float = 0.99

    @property
    def map_channels(self) -> int:
        return len(self.map_topics)

    @property
    def other_maps(self) -> tuple[int, ...]:
        """The maps that `finding_fine` reads out: all but `lesion_maps`."""
        return tuple(i for i in range(self.map_channels) if i not in self.lesion_maps)

    @property
    def tokens_per_axis(self) -> tuple[int, int, int]:
        return tuple(g // p for g, p in zip(self.grid, self.patch))  # type: ignore[return-value]

    @property
    def stem_strides(self) -> tuple[tuple[int, int, int], ...]:
        """The stem's four strides: the first makes the finding map's grid, all four a patch."""
        first = tuple(p // q for p, q in zip(self.patch, (4, 8, 8)))
        return first, (2, 2, 2), (2, 2, 2), (1, 2, 2)  # type: ignore[return-value]

    @property
    def finding_grid(self) -> tuple[int, int, int]:
        return tuple(g // s for g, s in zip(self.grid, self.stem_strides[0]))  # type: ignore[return-value]

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
class Encoded:
    """Encoded volumes: visual tokens and the dense finding maps."""

    tokens: torch.Tensor  # [V, 1 + N, dim], geometry token first
    finding_logits: torch.Tensor  # [V, finding types, *finding_grid]

    def token_findings(self, patch: tuple[int, int, int], map_topics: tuple[int, ...]) -> torch.Tensor:
        """[V, topics, N]: each token's highest probability of a finding of each topic
        (``patch`` finding-map cells per token, ``map_topics`` the topic of each map)."""
        found = F.max_pool3d(torch.sigmoid(self.finding_logits.float()), patch).flatten(2)
        owner = torch.tensor(map_topics, device=found.device)
        return torch.stack([found[:, owner == t].amax(1) for t in range(max(map_topics) + 1)], 1)

    def take(self, rows: torch.Tensor) -> Encoded:
        return Encoded(self.tokens[rows], self.finding_logits[rows])


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
        s = c.stem_channels
        widths = (c.channels, s, 2 * s, 4 * s, c.dim)
        self.stem = nn.ModuleList(
            nn.Conv3d(a, b, kernel_size=tuple(t + 1 if t > 1 else 1 for t in stride),
                      stride=stride, padding=tuple(t // 2 for t in stride))
            for a, b, stride in zip(widths, widths[1:], c.stem_strides)
        )
        # One 1x1 read-out per stage, summed at the finding grid: fine stages place, coarse ones decide.
        self.finding_heads = nn.ModuleList(nn.Conv3d(w, c.map_channels, kernel_size=1) for w in widths[1:4])
        self.finding_head = nn.Linear(c.dim, c.map_channels)
        # A deeper read-out at the second stage's grid, with the encoded tokens as context: the
        # stem's stages see too little around a cell to tell a bone lesion from cortex. The last
        # layers of this read-out and the next start at zero: no-ops on trained weights.
        self.finding_context = nn.Linear(c.dim, REFINE_CONTEXT)
        self.finding_refine = nn.Sequential(
            nn.Conv3d(widths[2] + REFINE_CONTEXT, REFINE_WIDTH, 3, padding=1), nn.GELU(),
            nn.Conv3d(REFINE_WIDTH, REFINE_WIDTH, 3, padding=1), nn.GELU(),
            nn.Conv3d(REFINE_WIDTH, c.map_channels, 1))
        # A read-out of the input itself at the finding grid: the stem's first stage serves every
        # later layer and keeps a cell's own HU only in part (a pneumothorax cell's lowest HU alone
        # tells it from normal lung; a linear read-out of that stage's features reached AUC 0.83).
        self.finding_fine = _input_read_out(c.channels, len(c.other_maps), c.stem_strides[0])
        # The lung lesion maps have one of their own (`LESION_TYPES`).
        self.finding_lesions = _input_read_out(c.channels, len(c.lesion_maps), c.stem_strides[0])
        for last in (self.finding_refine[-1], self.finding_fine[-1], self.finding_lesions[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.axis_position = nn.ParameterList(nn.Parameter(torch.zeros(n, c.dim)) for n in c.tokens_per_axis)
        self.geometry = nn.Linear(3, c.dim)
        self.encoder = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.dim)
        head_dim = c.dim // c.heads
        # Per layer, offsets for the two guides: anatomical region share and finding probability.
        self.guide_key = nn.Parameter(torch.zeros(c.decoder_layers, 2, c.heads, head_dim))
        self.guide_value = nn.Parameter(torch.zeros(c.decoder_layers, 2, c.heads, head_dim))
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.text_position = nn.Embedding(c.max_text, c.dim)
        self.decoder = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.decoder_layers))
        self.scheduler = TokenScheduler(c.saliency_top_quantile)
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.head.weight = self.token_embed.weight
        # Small embeddings: the head shares token_embed, and N(0, 1) would start with huge logits.
        for weight in (*self.axis_position, self.guide_key, self.guide_value, self.token_embed.weight,
                       self.text_position.weight):
            nn.init.normal_(weight, std=0.02)

    # --- vision ---------------------------------------------------------------------------

    def vision(self) -> list[nn.Module]:
        """The modules `encode` runs (training freezes them once the decoder learns)."""
        return [self.stem, self.finding_heads, self.finding_head, self.finding_context, self.finding_refine,
                self.finding_fine, self.finding_lesions, self.axis_position, self.geometry, self.encoder,
                self.encoder_norm]

    def encode(self, image: torch.Tensor, grid_spacing_mm: torch.Tensor) -> Encoded:
        """[B, C, D, H, W] windows + [B, 3] mm per grid cell → tokens and finding maps."""
        c = self.config
        d, h, w = c.tokens_per_axis
        k, r, col = self.axis_position
        position = (k[:, None, None] + r[None, :, None] + col[None, None, :]).reshape(d * h * w, -1)
        stages = []
        # Channels-last: oneDNN's 3D convolutions run about twice as fast on CPU in this layout.
        x = image = image.contiguous(memory_format=torch.channels_last_3d)
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i + 1 < len(self.stem):
                x = F.gelu(x)
                stages.append(x)
        x = x.flatten(2).transpose(1, 2) + position
        geometry = self.geometry(torch.log(grid_spacing_mm.float()))[:, None, :].to(x.dtype)
        x = torch.cat([geometry, x], dim=1)
        for block in self.encoder:
            x, _ = block(x, None)
        tokens = self.encoder_norm(x)
        from_tokens = self.finding_head(tokens[:, 1:]).transpose(1, 2).reshape(-1, c.map_channels, d, h, w)
        context = self.finding_context(tokens[:, 1:]).transpose(1, 2).reshape(-1, REFINE_CONTEXT, d, h, w)
        refined = self.finding_refine(torch.cat([stages[1], _upsample(context, tuple(stages[1].shape[2:]))], dim=1))
        logits = sum(_upsample(head(stage), c.finding_grid) for head, stage in zip(self.finding_heads, stages)) \
            + _upsample(from_tokens, c.finding_grid) + _upsample(refined, c.finding_grid)
        for maps, read_out in ((c.other_maps, self.finding_fine), (c.lesion_maps, self.finding_lesions)):
            logits = logits.index_add(1, torch.tensor(maps, device=logits.device), read_out(image))
        return Encoded(tokens, logits)

    def visual_stream(self, visual: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's keys and values [V, H, 1 + N, d] of the encoded tokens [V, 1 + N, dim].

        A visual token attends only to itself, so its attention output is its own projected value.
        """
        kv = []
        x = visual
        for i, block in enumerate(self.decoder):
            _, k, v = block.attn.project(block.norm1(x))
            kv.append((k, v))
            if i + 1 < len(self.decoder):
                b, h, t, d = v.shape
                x = x + block.attn.out(v.transpose(1, 2).reshape(b, t, h * d))
                x = x + block.mlp(block.norm2(x))
        return kv

    # --- language -------------------------------------------------------------------------

    def _text_embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embed(ids) + self.text_position(positions.clamp(max=self.config.max_text - 1))

    def prefill(self, visual: Encoded, region: torch.Tensor, prompt: torch.Tensor, pruning: Pruning = "hard",
                capacity: int = 0, physical: bool = False, rows: torch.Tensor | None = None,
                topic: torch.Tensor | None = None) -> Prefix:
        """Run [geometry, visual, prompt] through the decoder and schedule the visual tokens.

        Parameters
        ----------
        visual:
            The encoded volumes, one row per volume.
        region:
            [B, N] share of each visual token inside the prompt's anatomical region.
        prompt:
            [B, P] left-padded prompt ids (0 = padding).
        pruning:
            ``off`` keeps every token; ``soft`` scales the visual values by p; ``hard`` drops
            tokens with rho <= theta (surrogate gradient when training); ``flip`` keeps only
            the tokens ``hard`` would drop (Photon's flip regularizer).
        capacity:
            Extra cache slots for the tokens that will follow (answer or decoding).
        physical:
            Remove dropped tokens from the sequence and every cache (inference) instead of
            masking them (training, where the batch must keep one shape).
        rows:
            [B] the volume each prompt reads (default: row i reads volume i).
        topic:
            [B] the report topic (index) each prompt is about, -1 for any (default: any).
        """
        c = self.config
        n = c.visual_tokens
        b = prompt.shape[0]
        rows = torch.arange(b, device=prompt.device) if rows is None else rows
        stream = self.visual_stream(visual.tokens)
        prompt_valid = prompt != 0
        positions = (prompt_valid.cumsum(-1) - 1).clamp(min=0)
        x = self._text_embed(prompt, positions)
        guide = F.pad(torch.stack([region.float(), self._finding_guide(visual, rows, topic)], 1), (1, 0)).to(x.dtype)
        visual_valid = torch.ones(b, 1 + n, dtype=torch.bool, device=x.device)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
        p = gate = order = None
        visual_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        text_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.decoder):
            q, k, v = block.attn.project(block.norm1(x))
            vk = stream[i][0][rows] + torch.einsum("bgn,ghd->bhnd", guide, self.guide_key[i])
            vv = stream[i][1][rows] + torch.einsum("bgn,ghd->bhnd", guide, self.guide_value[i])
            if i == c.schedule_layer and pruning != "off":
                _, _, p = self.scheduler(q, k, vk[:, :, 1:], prompt_valid)
                keep = p > 0.5  # the same as rho > theta
                if pruning == "flip":
                    keep = ~keep
                if pruning == "soft":
                    gate, keep = p, torch.ones_like(keep)
                elif self.training:
                    # dL/d(gate) is each token's importance; Photon's surrogate turns it into p's gradient.
                    gate = SurrogateGate.apply(torch.ones_like(p)[..., None], p, keep).squeeze(-1)
                visual_valid = visual_valid.clone()
                visual_valid[:, 1:] = keep
                if physical:
                    order = _kept_order(keep)
                    visual_valid = torch.gather(visual_valid, 1, order)
                    visual_kv = [(_gather_cache(vk_, order), _gather_cache(vv_, order)) for vk_, vv_ in visual_kv]
            if gate is not None:
                vv = torch.cat([vv[:, :, :1], vv[:, :, 1:] * gate[:, None, :, None].to(vv.dtype)], dim=2)
            if order is not None:
                vk, vv = _gather_cache(vk, order), _gather_cache(vv, order)
            visual_kv.append((vk, vv))
            text_kv.append((k, v))
            mask = torch.cat([visual_valid[:, None, :].expand(-1, x.shape[1], -1),
                              causal[None] & prompt_valid[:, None, :]], dim=-1)[:, None]
            y = block.attn.attend(q, torch.cat([vk, k], dim=2), torch.cat([vv, v], dim=2), mask)
            x = x + y
            x = x + block.mlp(block.norm2(x))
        caches = [KVCache(torch.cat([vk, k], dim=2), torch.cat([vv, v], dim=2), vk.shape[2] + k.shape[2] + capacity)
                  for (vk, vv), (k, v) in zip(visual_kv, text_kv)]
        key_valid = torch.cat([visual_valid, prompt_valid], dim=1)
        logits = self.head(self.norm(x[:, -1]))  # prompts are left-padded: the last slot is real
        return Prefix(caches, key_valid, prompt_valid.sum(-1), keep.sum(-1), p, logits)

    def _finding_guide(self, visual: Encoded, rows: torch.Tensor, topic: torch.Tensor | None) -> torch.Tensor:
        """[B, N] each token's finding probability for the prompt's topic (of any topic for -1).

        Detached: the finding head learns from the finding maps alone, the decoder learns to use it.
        """
        cells = tuple(g // t for g, t in zip(self.config.finding_grid, self.config.tokens_per_axis))
        found = visual.token_findings(cells, self.config.map_topics).detach()[rows]  # [B, topics, N]
        if topic is None:
            return found.max(1).values
        picked = found.gather(1, topic.clamp(min=0)[:, None, None].expand(-1, 1, found.shape[-1])).squeeze(1)
        return torch.where((topic >= 0)[:, None], picked, found.max(1).values)

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

    def forward(self, visual: Encoded, region: torch.Tensor, prompt: torch.Tensor, answer: torch.Tensor,
                pruning: Pruning = "hard", rows: torch.Tensor | None = None,
                topic: torch.Tensor | None = None) -> tuple[torch.Tensor, Prefix]:
        """Teacher-forced logits [B, A, V] predicting each token of ``answer`` [B, A]."""
        prefix = self.prefill(visual, region, prompt, pruning, capacity=answer.shape[1], rows=rows, topic=topic)
        first = prefix.logits[:, None]
        if answer.shape[1] == 1:
            return first, prefix
        return torch.cat([first, self.extend(prefix, answer[:, :-1])], dim=1), prefix


def _input_read_out(channels: int, maps: int, stride: tuple[int, int, int]) -> nn.Sequential:
    """A few convolutions from the input to ``maps`` finding maps at the finding grid (``stride`` the stem's first)."""
    return nn.Sequential(
        nn.Conv3d(channels, FINE_WIDTH, kernel_size=stride, stride=stride), nn.GELU(),
        nn.Conv3d(FINE_WIDTH, FINE_WIDTH, (1, 3, 3), padding=(0, 1, 1)), nn.GELU(),
        nn.Conv3d(FINE_WIDTH, FINE_WIDTH, (1, 3, 3), padding=(0, 1, 1)), nn.GELU(),
        nn.Conv3d(FINE_WIDTH, maps, 1))


def _upsample(logits: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return logits if tuple(logits.shape[2:]) == size else F.interpolate(logits, size=size, mode="trilinear")


def _kept_order(keep: torch.Tensor) -> torch.Tensor:
    """Visual slots [B, 1 + longest kept] after removing dropped tokens: geometry, then kept ones.

    Kept tokens keep their original order; rows with fewer kept tokens carry dropped ones as
    masked padding.
    """
    b, n = keep.shape
    longest = int(keep.sum(-1).max())
    visual = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :longest] + 1
    return torch.cat([torch.zeros(b, 1, dtype=torch.long, device=keep.device), visual], dim=1)


def _gather_cache(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Select sequence positions ``order`` [B, T'] of a [B, H, T, d] key or value tensor."""
    return torch.gather(t, 2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
