"""Shared-prefix decoding for Gemma 3, with Photon-style training-free pruning of image tokens.

`engines.medgemma` reads a study as one long image prefix (up to 85 slices x 256 tokens)
followed by one short prompt per topic or question. This module runs Gemma 3's decoder layers
itself so that:

- the image prefix is prefilled once and its keys/values are reused by every prompt and
  rollout (rows of one batch), held once rather than copied per row (`TokenCache.share_rows`:
  85 slices' keys/values are 3.1 GB in bfloat16); each prompt pays only for its own tokens
  (the rows are decoded by `engines.medgemma_decode`);
- attention masks come from each slot's *position*, *validity* and *image block*, not from
  its index, so padding, pruned slots and rows of different lengths stay exact: causal by
  position, bidirectional inside one image (Gemma 3's ``token_type_ids`` rule), sliding
  window by position on sliding layers;
- optionally, at about a quarter of the depth, the image tokens are scored by the prompt's
  attention (Photon's centrality-weighted saliency, KNOWLEDGE.md section 5) and the ones a
  rule does not keep are removed from the hidden states and from the keys/values of the
  layers already run; the kept ones keep their original positions and image blocks. Each
  prompt keeps its own set (``scope="prompt"``), or all prompts of a read share one set
  chosen from their mean saliency (``scope="shared"``), so the kept prefix runs the
  remaining layers once instead of once per prompt.

Only the decoder layer modules of ``transformers`` are called (their projections and attention
kernels; the norms are swapped for fused ones, `engines.gemma_norm`); the loop, cache and masks are
here so they can be read top to bottom.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from engines.gemma_norm import fuse_rms_norms

KEEP_RULES = ("off", "threshold", "top_p", "ratio")
KEEP_SCOPES = ("prompt", "shared")


@dataclass(frozen=True)
class PruningConfig:
    """Which image tokens survive the pruning layer.

    Attributes
    ----------
    keep:
        ``off`` (keep all), ``threshold`` (keep tokens whose min-max normalized saliency
        rho exceeds ``keep_value``), ``top_p`` (keep the most salient tokens until their
        share of the total rho reaches ``keep_value``) or ``ratio`` (keep the
        ``keep_value`` share of image tokens with the highest saliency).
    keep_value:
        The rule's parameter: threshold in ``[0, 1)``, top-p or ratio in ``(0, 1]``.
    min_keep:
        Floor: at least this share of each prompt's image tokens (and at least one) is kept.
    layer:
        Decoder layer whose attention scores the tokens and from which they are removed;
        ``None`` means ``num_hidden_layers // 4``.
    scope:
        ``prompt`` (each prompt keeps its own set, Photon's per-question scheduling; the
        layers after the pruning layer then run the kept prefix once per prompt) or
        ``shared`` (one set for all prompts of a read, chosen from their mean saliency; the
        kept prefix runs those layers once; for many-topic reads where speed matters).
        With one prompt both give the same result.
    """

    keep: str = "off"
    keep_value: float = 0.5
    min_keep: float = 0.05
    layer: int | None = None
    scope: str = "prompt"

    def __post_init__(self) -> None:
        if self.keep not in KEEP_RULES:
            raise ValueError(f"pruning keep must be one of {', '.join(KEEP_RULES)}, got {self.keep!r}")
        if self.keep == "threshold" and not 0.0 <= self.keep_value < 1.0:
            raise ValueError(f"pruning keep_value for 'threshold' must be in [0, 1), got {self.keep_value}")
        if self.keep in ("top_p", "ratio") and not 0.0 < self.keep_value <= 1.0:
            raise ValueError(f"pruning keep_value for {self.keep!r} must be in (0, 1], got {self.keep_value}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise ValueError(f"pruning min_keep must be a share in [0, 1], got {self.min_keep}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"pruning layer must be >= 0, got {self.layer}")
        if self.scope not in KEEP_SCOPES:
            raise ValueError(f"pruning scope must be one of {', '.join(KEEP_SCOPES)}, got {self.scope!r}")

    @property
    def active(self) -> bool:
        return self.keep != "off"

    def layer_for(self, num_layers: int) -> int:
        """The pruning layer of a decoder with ``num_layers`` layers."""
        layer = num_layers // 4 if self.layer is None else self.layer
        if layer >= num_layers:
            raise ValueError(f"pruning layer {layer} does not exist: the decoder has {num_layers} layers")
        return layer


# --- Photon's saliency and the keep rules --------------------------------------------------


def saliency(q_prompt: torch.Tensor, k_prompt: torch.Tensor, k_image: torch.Tensor, scaling: float) -> torch.Tensor:
    """Photon's instruction-conditioned saliency u_j of each image token, for one sequence.

    Per head, prompt token t gets centrality c_t = sum over other prompt tokens t' of
    max(q_t . k_t' * scaling, 0) and weight w_t = c_t / max(sum c, 1); then
    u_j = mean over heads of sum_t w_t * q_t . k_j * scaling.

    Parameters
    ----------
    q_prompt, k_prompt:
        Post-RoPE queries and keys of the prompt tokens, ``[heads, T, d]`` (keys already
        repeated to the query heads).
    k_image:
        Post-RoPE keys of the image tokens, ``[heads, N, d]``.

    Returns
    -------
    torch.Tensor
        ``[N]`` float32.
    """
    q, kq, ki = q_prompt.float(), k_prompt.float(), k_image.float()
    scores = q @ kq.transpose(-1, -2) * scaling  # [H, T, T]
    eye = torch.eye(scores.shape[-1], dtype=torch.bool, device=scores.device)
    centrality = scores.clamp(min=0).masked_fill(eye, 0).sum(-1)  # [H, T]
    weights = centrality / centrality.sum(-1, keepdim=True).clamp(min=1.0)
    return (weights.unsqueeze(-1) * (q @ ki.transpose(-1, -2) * scaling)).sum(1).mean(0)


def normalized(u: torch.Tensor) -> torch.Tensor:
    """Min-max normalization to ``[0, 1]`` (rho); all ones when every value is equal."""
    span = u.max() - u.min()
    if span <= 0:
        return torch.ones_like(u)
    return (u - u.min()) / span


def keep_tokens(u: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    """Boolean mask over image tokens: which ones ``config`` keeps given saliency ``u``."""
    n = u.numel()
    if not config.active or n == 0:
        return torch.ones(n, dtype=torch.bool, device=u.device)
    rho = normalized(u)
    order = torch.argsort(rho, descending=True, stable=True)
    if config.keep == "threshold":
        keep = rho > config.keep_value
    elif config.keep == "top_p":
        mass = torch.cumsum(rho[order], 0) / rho.sum()
        # The smallest prefix whose mass reaches p (a tiny slack absorbs float rounding).
        count = int(torch.searchsorted(mass, torch.tensor(config.keep_value - 1e-6, device=u.device))) + 1
        keep = torch.zeros(n, dtype=torch.bool, device=u.device)
        keep[order[: min(count, n)]] = True
    else:  # ratio
        keep = torch.zeros(n, dtype=torch.bool, device=u.device)
        keep[order[: max(1, math.ceil(config.keep_value * n - 1e-9))]] = True
    floor = max(1, math.ceil(config.min_keep * n - 1e-9))
    if int(keep.sum()) < floor:
        keep[order[:floor]] = True
    return keep


# --- Cache with per-slot metadata ---------------------------------------------------------


class TokenCache:
    """Keys and values of every decoder layer for a batch of rows, plus per-slot metadata.

    Each slot (a column of the cache) has a position (its RoPE position, which is what the
    masks compare), a validity flag (padding and pruned-away slots are invalid and never
    attended to) and an image block id (``-1`` for text; slots of one image share an id
    and attend to each other both ways). Gemma 3's attention modules call `update`.

    The first ``shared`` slots may be the same in every row (`share_rows`: a study's image
    prefix under several prompts). Their keys and values are then held once, as one row in
    ``shared_keys``/``shared_values``, and ``keys``/``values`` hold each row's later slots only;
    the metadata covers every slot of every row either way.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.shared_keys: list[torch.Tensor | None] = [None] * num_layers
        self.shared_values: list[torch.Tensor | None] = [None] * num_layers
        self.shared = 0
        self.pos: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.block: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.pos is None else int(self.pos.shape[1])

    @property
    def rows(self) -> int:
        return 0 if self.pos is None else int(self.pos.shape[0])

    def add_slots(self, pos: torch.Tensor, valid: torch.Tensor, block: torch.Tensor) -> None:
        """Announce the slots the next forward appends (call before running the layers)."""
        if self.pos is None:
            self.pos, self.valid, self.block = pos, valid, block
        else:
            self.pos = torch.cat([self.pos, pos], 1)
            self.valid = torch.cat([self.valid, valid], 1)
            self.block = torch.cat([self.block, block], 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append one layer's new keys/values (``[B, kv_heads, T, d]``); return the rows' own ones (all
        of them but the shared slots)."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], 2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def copy(self) -> TokenCache:
        """A new cache over the same tensors (they are replaced, never changed in place)."""
        other = TokenCache(len(self.keys))
        other.keys, other.values = list(self.keys), list(self.values)
        other.shared_keys, other.shared_values, other.shared = list(self.shared_keys), list(self.shared_values), self.shared
        other.pos, other.valid, other.block = self.pos, self.valid, self.block
        return other

    def share_rows(self, rows: int) -> None:
        """One row becomes ``rows`` rows that share its slots, held once (nothing is copied)."""
        if self.rows != 1 or self.shared:
            raise ValueError(f"only a one-row cache without shared slots can share its rows; this one has "
                             f"{self.rows} rows and {self.shared} shared slots")
        self.shared_keys, self.shared_values, self.shared = self.keys, self.values, self.length
        self.keys, self.values = [None] * len(self.keys), [None] * len(self.values)
        self.pos, self.valid, self.block = (t.expand(rows, -1) for t in (self.pos, self.valid, self.block))

    def slots(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots ``index[b]`` (``[B, T']``) of each row ``b`` of ``layer``."""
        out = []
        for shared, own in ((self.shared_keys[layer], self.keys[layer]), (self.shared_values[layer], self.values[layer])):
            if shared is None:
                out.append(_take(own, index))
                continue
            shared = shared.expand(index.shape[0], -1, -1, -1)  # a view: the one row is not copied
            if own is None:
                out.append(_take(shared, index))
                continue
            in_shared = (index < self.shared)[:, None, :, None]
            out.append(torch.where(in_shared, _take(shared, index.clamp(max=self.shared - 1)),
                                   _take(own, (index - self.shared).clamp(min=0))))
        return out[0], out[1]

    def leading(self, layer: int, width: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``width`` slots of the first ``rows`` rows of ``layer``."""
        if self.shared and width <= self.shared:
            return tuple(t[layer][:, :, :width].expand(rows, -1, -1, -1) for t in (self.shared_keys, self.shared_values))
        return self.slots(layer, torch.arange(width, device=self.pos.device).expand(rows, -1))

    def trailing(self, layer: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every row's own slots from ``start`` (not before the shared ones) on, of ``layer``."""
        if start < self.shared:
            raise ValueError(f"slot {start} is one of the {self.shared} shared slots; `slots` reads those per row")
        return self.keys[layer][:, :, start - self.shared:], self.values[layer][:, :, start - self.shared:]

    def release(self, layer: int) -> None:
        """Free ``layer``'s keys and values (the cache cannot be used for it afterwards)."""
        self.keys[layer] = self.values[layer] = self.shared_keys[layer] = self.shared_values[layer] = None

    def gather_slots(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep, per row, the slots ``index[b]`` (``[B, T']``); ``valid`` marks padding as invalid.
        Every row then holds its own copy (no slot stays shared)."""
        for i in range(len(self.keys)):
            if self.keys[i] is not None or self.shared_keys[i] is not None:
                self.keys[i], self.values[i] = self.slots(i, index)
        self.shared_keys, self.shared_values, self.shared = [None] * len(self.keys), [None] * len(self.keys), 0
        self.pos = self.pos.gather(1, index)
        self.block = self.block.gather(1, index)
        self.valid = self.valid.gather(1, index) & valid


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Slots ``index[b]`` (``[B, T']``) of each row of ``t`` (``[B, kv_heads, S, d]``)."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


# --- The decoder loop ----------------------------------------------------------------------

#: The attention implementation `Gemma3Decoder` gives the text layers: SDPA, unless a layer is
#: called with ``attend=``, a function with SDPA's signature that then computes it instead (the
#: decode steps keep part of their keys/values outside the layer's cache, `engines.medgemma_decode`).
ATTENTION = "readout_sdpa"


def _attention(module, query, key, value, attention_mask, attend=None, **kwargs):
    return (attend or sdpa_attention_forward)(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the model's own forward (e.g. `generate`) masks as for SDPA

#: Queries per chunk of a forward. Each chunk attends only to the span of slots its mask reaches
#: (the sliding window, the causal past) instead of all of them through a dense mask: an 85-slice
#: prefix has 22k tokens, a sliding layer's window 1024, and the prompts after it (tens of tokens,
#: one chunk) reach only the prefix's last window on the sliding layers.
PREFILL_CHUNK = 2048


def _reach(mask: torch.Tensor, chunk: int) -> list[tuple[int, int, int, int]]:
    """Per chunk of queries of ``mask`` (``[B, 1, Q, KV]``): ``(q0, q1, k0, k1)``, the slots
    ``k0 .. k1-1`` holding every one that any of its queries attends to."""
    spans = []
    for q0 in range(0, mask.shape[2], chunk):
        seen = mask[:, :, q0 : q0 + chunk].flatten(0, 2).any(0)
        spans.append(torch.stack([seen.int().argmax(), seen.shape[0] - seen.flip(0).int().argmax()]))
    bounds = torch.stack(spans).tolist()  # one device sync for all chunks
    return [(q0, min(q0 + chunk, mask.shape[2]), k0, k1) for q0, (k0, k1) in zip(range(0, mask.shape[2], chunk), bounds)]


def _chunked_attention(spans, cache: TokenCache, module, query, key, value, attention_mask, **kwargs):
    """Attention chunk by chunk of queries, each on its own span of slots (see `_reach`). ``key`` and
    ``value`` are the rows' own slots (`TokenCache.update`); a span that reaches the cache's shared
    slots goes through `_shared_attention`, one that does not through SDPA."""
    shared, layer = cache.shared, module.layer_idx
    out = []
    for q0, q1, k0, k1 in spans:
        q, mask = query[:, :, q0:q1], attention_mask[:, :, q0:q1, k0:k1]
        own = slice(max(k0, shared) - shared, k1 - shared)
        if k0 >= shared:
            out.append(sdpa_attention_forward(module, q, key[:, :, own], value[:, :, own], mask, **kwargs)[0])
        else:
            held = slice(k0, min(k1, shared))
            out.append(_shared_attention(q, cache.shared_keys[layer][:, :, held], cache.shared_values[layer][:, :, held],
                                         key[:, :, own], value[:, :, own], mask, kwargs["scaling"]))
    return (out[0] if len(out) == 1 else torch.cat(out, 1)), None


def _shared_attention(query: torch.Tensor, shared_key: torch.Tensor, shared_value: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention in float32 of every row's queries (``[B, H, Q, d]``) over slots held once for all rows
    (``shared_*``, ``[1, kv, S, d]``), then the row's own (``key``/``value``, ``[B, kv, T, d]``), one
    softmax over both, ``mask`` ``[B, 1, Q, S + T]``. The shared keys meet all rows' queries in one
    product, as the decode steps do (`engines.medgemma_decode`); meant for prompts (tens of queries
    a row). Returns ``[B, Q, H, d]``, as SDPA's wrapper does."""
    rows, heads, length, dim = query.shape
    kv, held = shared_key.shape[1], shared_key.shape[2]
    # Query head h reads key/value head h // (heads / kv), as Gemma 3's grouped-query attention does.
    q = query.float().reshape(rows, kv, heads // kv * length, dim) * scaling

    def across_rows(x: torch.Tensor) -> torch.Tensor:  # [B, kv, n, m] -> [1, kv, B * n, m]
        return x.transpose(0, 1).reshape(1, kv, -1, x.shape[-1])

    def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.reshape(kv, rows, -1, x.shape[-1]).transpose(0, 1)

    scores = torch.cat([by_row(across_rows(q) @ shared_key.float().transpose(-1, -2)),
                        q @ key.float().transpose(-1, -2)], -1)
    probs = (scores.view(rows, kv, heads // kv, length, -1).masked_fill(~mask[:, :, None], float("-inf"))
             .softmax(-1).view(rows, kv, heads // kv * length, -1))
    out = by_row(across_rows(probs[..., :held]) @ shared_value.float()) + probs[..., held:] @ value.float()
    return out.reshape(rows, heads, length, dim).transpose(1, 2).to(query.dtype)


class Gemma3Decoder:
    """Runs a loaded ``Gemma3ForConditionalGeneration``'s parts over a `TokenCache`."""

    def __init__(self, model) -> None:
        self.model = model
        self.text_config = model.config.get_text_config()
        self.lm = model.model.language_model
        self.num_layers = len(self.lm.layers)
        self.layer_types = list(self.text_config.layer_types)[: self.num_layers]
        self.window = self.text_config.sliding_window
        self.image_token_id = model.config.image_token_id
        implementation = self.text_config._attn_implementation
        if implementation not in ("sdpa", ATTENTION):
            raise ValueError(f"attention implementation {implementation!r} is not supported; load with 'sdpa'")
        # SDPA still, for every caller of the model; our own loops can now pass ``attend=``.
        self.text_config._attn_implementation = ATTENTION
        # The same norms in fewer kernels, for every caller of the model too (`engines.gemma_norm`).
        fuse_rms_norms(model)

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Soft tokens of each image, ``[images, mm_tokens_per_image, hidden]``."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        return self.model.model.get_image_features(pixel_values, return_dict=True).pooler_output

    def embed(self, ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image soft tokens put in place of the image placeholders."""
        is_image = ids == self.image_token_id
        lookup = ids.masked_fill(is_image, 0) if self.image_token_id >= self.lm.vocab_size else ids
        hidden = self.lm.embed_tokens(lookup)
        if image_features is not None:
            features = image_features.to(hidden.dtype).reshape(-1, hidden.shape[-1])
            if int(is_image.sum()) != features.shape[0]:
                raise ValueError(f"{int(is_image.sum())} image placeholders but {features.shape[0]} image soft tokens")
            hidden = hidden.masked_scatter(is_image.unsqueeze(-1), features)
        return hidden

    def masks(self, q_pos: torch.Tensor, q_block: torch.Tensor, cache: TokenCache) -> dict[str, torch.Tensor]:
        """Attention masks ``[B, 1, Q, KV]`` per layer type for queries against every cache slot."""
        kv_pos, kv_block = cache.pos[:, None, :], cache.block[:, None, :]
        qp, qb = q_pos[:, :, None], q_block[:, :, None]
        same_image = (qb == kv_block) & (qb >= 0)
        full = cache.valid[:, None, :] & ((kv_pos <= qp) | same_image)
        sliding = full & (kv_pos > qp - self.window) if self.window else full
        out = {}
        for kind, mask in (("full_attention", full), ("sliding_attention", sliding)):
            # A query with nothing to attend to (padding) would turn into NaN and poison the
            # values it leaves in the cache; let it see its own slot (every query has one), which
            # keeps its reach (`_reach`) as short as a real query's.
            empty = ~mask.any(-1, keepdim=True)
            out[kind] = (mask | (empty & (kv_pos == qp))).unsqueeze(1)
        return out

    def run_layers(self, hidden: torch.Tensor, pos: torch.Tensor, block: torch.Tensor, cache: TokenCache,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run layers ``start .. stop-1`` on ``hidden`` (whose slots `cache` already knows)."""
        stop = self.num_layers if stop is None else stop
        masks = self.masks(pos, block, cache)
        kinds = set(self.layer_types[start:stop])
        rope = {kind: self.lm.rotary_emb(hidden, pos, kind) for kind in kinds}
        attend = {kind: functools.partial(_chunked_attention, _reach(masks[kind], PREFILL_CHUNK), cache) for kind in kinds}
        for i in range(start, stop):
            kind = self.layer_types[i]
            hidden = self.lm.layers[i](hidden, position_embeddings=rope[kind], attention_mask=masks[kind],
                                       position_ids=pos, cache=cache, attend=attend[kind])
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.lm.norm(hidden)).float()

    def queries_keys(self, layer: int, hidden: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE queries ``[B, H, T, d]`` and keys (repeated to ``H`` heads) of ``layer``."""
        block = self.lm.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(x).view(shape).transpose(1, 2))
        cos, sin = self.lm.rotary_emb(x, pos, self.layer_types[layer])
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q, k.repeat_interleave(attn.num_key_value_groups, dim=1)

    def scaling(self, layer: int) -> float:
        return float(self.lm.layers[layer].self_attn.scaling)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Gemma 3 applies it (rotate-half), ``x`` ``[B, H, T, d]``, ``cos``/``sin`` ``[B, T, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


# --- One study: shared prefix, then prompts (with pruning) ----------------------------------


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """Block id per slot: consecutive image tokens share one id (0, 1, ...), text is ``-1``."""
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[..., :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.long(), -1) - 1, -1)


@dataclass
class Prefix:
    """The image prefix after its shared prefill (one row; consumed by `prefill_prompts`).

    ``hidden`` is the prefix's hidden state at the input of layer ``stop`` when pruning
    follows (the prompts need it to score and to run the remaining layers), else ``None``.
    """

    cache: TokenCache
    length: int
    is_image: torch.Tensor  # [length] bool
    stop: int
    hidden: torch.Tensor | None


def prefill_prefix(decoder: Gemma3Decoder, ids: torch.Tensor, image_features: torch.Tensor,
                   prune_layer: int | None = None) -> Prefix:
    """Prefill ``ids`` (``[L]``, with image placeholders) once, up to ``prune_layer`` if given."""
    ids = ids.to(decoder.device)[None]
    length = ids.shape[1]
    is_image = ids == decoder.image_token_id
    pos = torch.arange(length, device=ids.device)[None]
    block = image_blocks(is_image)
    cache = TokenCache(decoder.num_layers)
    cache.add_slots(pos, torch.ones_like(is_image), block)
    stop = decoder.num_layers if prune_layer is None else prune_layer
    hidden = decoder.run_layers(decoder.embed(ids, image_features), pos, block, cache, 0, stop)
    return Prefix(cache, length, is_image[0], stop, hidden if prune_layer is not None else None)


@dataclass
class Prompted:
    """Rows ready to decode: one per prompt, with the logits of each prompt's next token."""

    cache: TokenCache
    next_logits: torch.Tensor  # [P, vocab] float32
    next_pos: torch.Tensor  # [P] position of the first generated token
    kept_ratio: list[float] | None  # share of image tokens each prompt kept (pruning only)
    shared_slots: int  # leading cache slots that are the same in every row (0 with a per-prompt keep)


def prefill_prompts(decoder: Gemma3Decoder, prefix: Prefix, prompts: list[list[int]],
                    pruning: PruningConfig | None = None) -> Prompted:
    """Run every prompt's own tokens after the shared prefix, as one batch.

    Without pruning the prompts attend to the prefix's cache of every layer. With pruning
    they run up to the pruning layer on the shared cache; there each prompt scores the image
    tokens. With ``scope="prompt"`` each keeps its own set and the kept prefix slots plus the
    prompt run the remaining layers per prompt; with ``scope="shared"`` the prompts' mean
    saliency picks one set, the kept prefix runs the remaining layers once, and the prompts
    run them on it.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token after the shared prefix")
    pruning = pruning or PruningConfig()
    device = decoder.device
    n, longest = len(prompts), max(map(len, prompts))
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
    valid = torch.arange(longest, device=device)[None] < lengths[:, None]
    pos = (prefix.length + torch.arange(longest, device=device))[None].expand(n, -1)
    block = torch.full_like(ids, -1)
    shared = prefix.hidden is not None and pruning.scope == "shared"
    # A shared keep prunes the prefix's own one-row cache later; the prompts score on a copy.
    cache = prefix.cache.copy() if shared else prefix.cache
    cache.share_rows(n)  # the prefix's keys/values stay one row; the prompts' own follow per row
    cache.add_slots(pos, valid, block)
    hidden = decoder.run_layers(decoder.embed(ids), pos, block, cache, 0, prefix.stop)
    offset, kept_ratio = 0, None
    per_prompt = prefix.hidden is not None and not shared
    if shared:
        hidden, cache, kept_ratio = _prune_shared(decoder, prefix, hidden, pos, valid, lengths, cache, pruning)
    elif per_prompt:
        hidden, offset, kept_ratio = _prune(decoder, prefix, hidden, pos, lengths, cache, pruning)
    last = hidden[torch.arange(n, device=device), offset + lengths - 1]
    # Every row holds the same (possibly pruned) prefix before its own tokens, unless each prompt kept its own.
    return Prompted(cache, decoder.logits(last), prefix.length + lengths, kept_ratio, cache.shared)


def _saliencies(decoder: Gemma3Decoder, prefix: Prefix, hidden: torch.Tensor, pos: torch.Tensor,
                lengths: torch.Tensor) -> list[torch.Tensor]:
    """Each prompt's saliency ``[N]`` of the prefix's image tokens at the pruning layer."""
    layer = prefix.stop
    image_slots = torch.nonzero(prefix.is_image).squeeze(1)
    prefix_pos = prefix.cache.pos[:1, : prefix.length]
    _, k_image = decoder.queries_keys(layer, prefix.hidden[:, image_slots], prefix_pos[:, image_slots])
    q_prompt, k_prompt = decoder.queries_keys(layer, hidden, pos)
    return [saliency(q_prompt[row, :, :m], k_prompt[row, :, :m], k_image[0], decoder.scaling(layer))
            for row, m in enumerate(lengths.tolist())]


def _kept_slots(prefix: Prefix, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Prefix slots that survive (all text, the kept image tokens) and the kept image share."""
    slots = ~prefix.is_image.clone()
    slots[torch.nonzero(prefix.is_image).squeeze(1)[keep]] = True
    return torch.nonzero(slots).squeeze(1), float(keep.float().mean()) if keep.numel() else 1.0


def _prune(decoder: Gemma3Decoder, prefix: Prefix, hidden: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor,
           cache: TokenCache, pruning: PruningConfig) -> tuple[torch.Tensor, int, list[float]]:
    """Per prompt: score, keep, drop; then run the layers from the pruning layer on. Returns the
    prompts' final hidden states, where their own tokens start, and the kept share per prompt."""
    layer, device = prefix.stop, decoder.device
    kept = [_kept_slots(prefix, keep_tokens(u, pruning)) for u in _saliencies(decoder, prefix, hidden, pos, lengths)]
    kept_slots, kept_ratio = [s for s, _ in kept], [r for _, r in kept]
    longest = max(len(s) for s in kept_slots)
    index = torch.zeros(len(kept_slots), longest, dtype=torch.long, device=device)
    real = torch.zeros(len(kept_slots), longest, dtype=torch.bool, device=device)
    for row, slots in enumerate(kept_slots):
        index[row, : len(slots)], real[row, : len(slots)] = slots, True
    own = prefix.length + torch.arange(hidden.shape[1], device=device)[None].expand(len(kept_slots), -1)
    cache.gather_slots(torch.cat([index, own], 1), torch.cat([real, torch.ones_like(own, dtype=torch.bool)], 1))
    kept_hidden = prefix.hidden[0][index]  # [P, longest, D]
    combined = torch.cat([kept_hidden, hidden], 1)
    out = decoder.run_layers(combined, cache.pos, cache.block, cache, layer, decoder.num_layers)
    return out, longest, kept_ratio


def _prune_shared(decoder: Gemma3Decoder, prefix: Prefix, hidden: torch.Tensor, pos: torch.Tensor,
                  valid: torch.Tensor, lengths: torch.Tensor, scoring: TokenCache,
                  pruning: PruningConfig) -> tuple[torch.Tensor, TokenCache, list[float]]:
    """One keep set from the prompts' mean saliency; the kept prefix runs the layers from the
    pruning layer on once (one row), then the prompts run them on it. ``scoring`` holds the
    prompts' rows up to the pruning layer. Returns the prompts' final hidden states (their own
    tokens only), the cache to decode on and the kept share (the same for every prompt)."""
    layer, n, device = prefix.stop, len(lengths), decoder.device
    keep = keep_tokens(torch.stack(_saliencies(decoder, prefix, hidden, pos, lengths)).mean(0), pruning)
    slots, share = _kept_slots(prefix, keep)
    cache = prefix.cache  # still one row over the whole prefix, layers before the pruning layer
    cache.gather_slots(slots[None], torch.ones(1, len(slots), dtype=torch.bool, device=device))
    decoder.run_layers(prefix.hidden[:, slots], cache.pos, cache.block, cache, layer, decoder.num_layers)
    # The prompts' keys/values of the first layers were computed on the full prefix (as with a
    # per-prompt keep); they follow the kept prefix, which all rows share, in the cache.
    text = torch.full_like(pos, -1)
    cache.share_rows(n)
    cache.add_slots(pos, valid, text)
    cache.keys[:layer], cache.values[:layer] = scoring.keys[:layer], scoring.values[:layer]
    out = decoder.run_layers(hidden, pos, text, cache, layer, decoder.num_layers)
    return out, cache, [share] * n
