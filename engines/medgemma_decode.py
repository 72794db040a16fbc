"""Readout's one decode path for Gemma 3: prompted rows over fixed-size key/value buffers.

`engines.medgemma_pruning` prefills the shared image prefix once and each prompt on it; this
module decodes every prompt ``rollouts`` times as one batch (row = prompt * rollouts + rollout):

- the buffers are allocated once, at their final size, and filled straight from the prompted
  cache. A global layer sees a row's whole context, but most of it is the study's image prefix,
  the same in every row: it is kept once (once per prompt when each prompt kept its own image
  tokens), in float32, and attended to by every row's query in one matrix product; only the
  rows' own slots are stored per row. A sliding-window layer keeps only the slots a new token can
  still see (position > first new position - window), per row;
- every layer attends through `StaticDecoder._attend` (matrix products in float32), not SDPA: on
  an H200 at batch 8, cuDNN's SDPA kernel took 94 us per sliding layer for one query per row
  (bench/RESULTS.md has the step's profile);
- masks come from each slot's position and validity, as in `Gemma3Decoder.masks` (a new token
  is text, so no image block applies); slots not yet written are hidden by the causal rule;
- every step runs the same kernels on the same addresses, so on CUDA one step is captured as a
  graph and replayed (eager steps, with the reason recorded, where capture fails);
- sampling is Gumbel-max (argmax of logits / T plus Gumbel noise) from a seeded generator, which
  the graph can replay; ``done`` is read back only every `STOP_CHECK_EVERY` steps, so the device
  does not wait on the host once per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from engines.medgemma_pruning import Gemma3Decoder, Prompted

#: Steps between the host's reads of "has every row stopped?" (each read is a device sync).
STOP_CHECK_EVERY = 16
#: Batch layouts whose decoders `KeptDecoders` keeps: a study's read and its re-looks.
KEPT_LAYOUTS = 2
#: Key/value buffers hold a multiple of this many slots, so that the attention's weighted sum of
#: values runs as many short products, summed (`_weighted_values`). As one product over 22k
#: slots, cuBLAS chose a matrix-vector kernel that took 0.73 ms a layer on an H200 (profile in
#: bench/RESULTS.md); the padding slots are masked out.
SLOT_CHUNK = 128


def _padded(slots: int) -> int:
    return -(-slots // SLOT_CHUNK) * SLOT_CHUNK


def _weighted_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs @ values`` (``[..., M, S] @ [..., S, d]``, S a multiple of `SLOT_CHUNK`), chunk by chunk of slots."""
    *batch, m, slots = probs.shape
    chunks = slots // SLOT_CHUNK
    parts = probs.reshape(*batch, m, chunks, SLOT_CHUNK).transpose(-3, -2) @ values.reshape(
        *batch, chunks, SLOT_CHUNK, values.shape[-1])
    return parts.sum(-3)


@dataclass
class Generated:
    """Per row (prompt-major: row = prompt * rollouts + rollout): tokens and their entropies."""

    tokens: list[list[int]]
    entropies: list[list[float]]  # nats, of the distribution each token was drawn from
    steps: int  # tokens drawn per row (stop tokens and what follows them included)


class StaticDecoder:
    """Decoding of one prompted batch (greedy, or sampled at ``temperature``) over static buffers.

    Parameters
    ----------
    decoder, prompted:
        The model's parts and the rows `prefill_prompts` left (one per prompt).
    rollouts:
        Rows per prompt; they share the prompt's context and differ only by their samples.
    max_new_tokens:
        Tokens per row at most (the buffers' new slots).
    temperature, seed:
        Sampled at ``temperature`` from a generator seeded with ``seed`` when ``rollouts > 1``
        and ``temperature > 0``; greedy otherwise.
    stop_ids:
        A row is done once it draws one of these.
    graph:
        Capture one step as a CUDA graph; ``None`` means "when the device is CUDA".
    compile_step:
        ``torch.compile`` the step first (benchmarks only: with the capture, 27 s on an H200).
    release:
        Free each layer's keys/values in ``prompted.cache`` once copied (lowers the peak memory;
        the prompted cache cannot be used afterwards).
    """

    def __init__(self, decoder: Gemma3Decoder, prompted: Prompted, *, rollouts: int = 1, max_new_tokens: int,
                 temperature: float = 0.0, seed: int = 0, stop_ids: set[int] | frozenset[int] = frozenset(),
                 graph: bool | None = None, compile_step: bool = False, release: bool = False) -> None:
        if rollouts < 1:
            raise ValueError(f"rollouts must be at least 1, got {rollouts}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.decoder, self.rollouts, self.steps = decoder, rollouts, max_new_tokens
        self.prompts = prompted.next_logits.shape[0]
        self.rows = self.prompts * rollouts
        self.sample, self.temperature, self.seed = rollouts > 1 and temperature > 0, temperature, seed
        self.stop_ids = frozenset(stop_ids)
        device, batch = decoder.device, self.rows
        self.kinds = sorted(set(decoder.layer_types))
        # Layers that see the whole context split it into a shared part and the rows' own slots.
        self.split_kinds = {k for k in self.kinds if k != "sliding_attention" or not decoder.window}
        # Rows that share one copy of that part: all of them, or each prompt's rollouts.
        self.groups = 1 if prompted.shared_slots else self.prompts
        # Slots of each part, fixed here for the life of the buffers; padded, so that a later read
        # whose prompts are a little longer still fits (`fits`).
        self.shared_slots = _padded(self._shared_width(prompted))
        self.context_slots = {kind: _padded(self._columns(prompted, kind)[1].shape[1]) for kind in self.kinds}
        slots = {kind: _padded(self.context_slots[kind] + self.steps) for kind in self.kinds}
        # Additive mask of the shared slots (0 or -inf), one row per group: padding and unused slots are hidden.
        self.shared_bias = torch.zeros(self.groups, 1, 1, self.shared_slots, dtype=torch.float32, device=device)
        self.shared_keys: list[torch.Tensor | None] = []
        self.shared_values: list[torch.Tensor | None] = []
        self.kv_pos = {k: torch.zeros(batch, slots[k], dtype=torch.long, device=device) for k in self.kinds}
        self.kv_valid = {k: torch.zeros(batch, slots[k], dtype=torch.bool, device=device) for k in self.kinds}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []  # allocated layer by layer in `load`, as the source is freed
        self.first_logits = torch.zeros(batch, prompted.next_logits.shape[1], dtype=torch.float32, device=device)
        self.first_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # steps fed so far
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, self.steps, dtype=torch.long, device=device)
        self.entropies = torch.zeros(batch, self.steps, dtype=torch.float32, device=device)
        self.write_at = {k: torch.tensor([self.context_slots[k]], device=device) for k in self.kinds}
        self.write_index = dict(self.write_at)
        self.generator = torch.Generator(device=device) if self.sample else None
        self.step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step
        self.load(prompted, release=release)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_error: str | None = None
        if self.steps > 1 and ((device.type == "cuda") if graph is None else graph):
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 - eager steps still decode; say why
                self.capture_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                self.graph = None
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                # `run` resets every state the warm-up steps changed; the new slots they wrote
                # stay hidden (by position) until a real step overwrites them.

    # --- filling the buffers -------------------------------------------------------------------

    def fits(self, prompted: Prompted, *, rollouts: int, temperature: float) -> bool:
        """Whether `load` can take ``prompted`` for a read with these settings (the temperature is
        part of the captured graph)."""
        if (prompted.next_logits.shape[0], rollouts, temperature) != (self.prompts, self.rollouts, self.temperature):
            return False
        if self.groups != self.prompts and not prompted.shared_slots:
            return False
        return self._shared_width(prompted) <= self.shared_slots and all(
            self._columns(prompted, kind)[1].shape[1] <= self.context_slots[kind] for kind in self.kinds)

    def _shared_width(self, prompted: Prompted) -> int:
        """Leading columns of the prompted cache that the split layers keep in their shared part."""
        if self.groups == self.prompts:  # each prompt's whole context, shared by its rollouts
            return prompted.cache.length
        if not prompted.shared_slots:
            raise ValueError("these buffers share one prefix among all prompts; each prompt of this cache kept its own")
        return prompted.shared_slots

    def _columns(self, prompted: Prompted, kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Which columns of the prompted cache a row of ``kind`` layers keeps per row: ``(index, real)``,
        ``[P, S]`` each (``index`` None: all after the shared ones, in order); ``real`` is False on padding."""
        cache, window = prompted.cache, self.decoder.window
        if kind in self.split_kinds:
            return None, cache.valid[:, self._shared_width(prompted):]
        needed = cache.valid & (cache.pos > prompted.next_pos[:, None] - window)
        width = int(needed.sum(1).max())
        # Needed columns first, in cache order (a stable sort of "not needed").
        index = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :width]
        return index, needed.gather(1, index)

    def load(self, prompted: Prompted, *, release: bool = False) -> None:
        """Fill the buffers from ``prompted`` (same prompt count; contexts no longer than the first)."""
        cache, decoder = prompted.cache, self.decoder
        if prompted.next_logits.shape[0] != self.prompts:
            raise ValueError(f"these buffers hold {self.prompts} prompts, the prompted cache has "
                             f"{prompted.next_logits.shape[0]}")
        first = prompted.next_pos.repeat_interleave(self.rollouts)
        new = first[:, None] + torch.arange(self.steps, device=first.device)[None]
        shared = self._shared_width(prompted)
        if shared > self.shared_slots:
            raise ValueError(f"the context has {shared} shared slots, the buffers hold {self.shared_slots}")
        # The groups' rows of the prompted cache: row 0 when all prompts share the prefix.
        valid = cache.valid[: self.groups, :shared]
        self.shared_bias.fill_(float("-inf"))
        self.shared_bias[:, 0, 0, :shared].masked_fill_(valid, 0.0)
        columns = {}
        for kind in self.kinds:
            index, real = columns[kind] = self._columns(prompted, kind)
            width, capacity = real.shape[1], self.context_slots[kind]
            if width > capacity:
                raise ValueError(f"{kind} layers need {width} context slots per row, the buffers hold {capacity}")
            pos = cache.pos[:, shared:] if kind in self.split_kinds else cache.pos.gather(1, index)
            self._broadcast(self.kv_pos[kind][:, :width], pos)
            self._broadcast(self.kv_valid[kind][:, :width], real)
            self.kv_valid[kind][:, width:capacity] = False
            new_slots = slice(capacity, capacity + self.steps)  # then padding, never valid
            self.kv_pos[kind][:, new_slots].copy_(new)
            # New slots count as valid from the start: a slot's position is only <= the
            # query's once its token has been fed, so the causal rule hides unwritten ones.
            self.kv_valid[kind][:, new_slots] = True
        for i, kind in enumerate(decoder.layer_types):
            index, real = columns[kind]
            width, split = real.shape[1], kind in self.split_kinds
            if split:  # the groups' shared part, then each row's own slots
                parts = zip(cache.leading(i, shared, self.groups), cache.trailing(i, shared))
            else:
                parts = zip((None, None), cache.slots(i, index))
            # Every layer attends in float32 (`_attend`), so its buffers are float32.
            for store, shared_store, (lead, own) in zip((self.keys, self.values), (self.shared_keys, self.shared_values),
                                                        parts):
                if len(store) <= i:
                    _, heads, _, dim = own.shape
                    store.append(torch.zeros(self.rows, heads, self.kv_pos[kind].shape[1], dim,
                                             dtype=torch.float32, device=own.device))
                    shared_store.append(torch.zeros(self.groups, heads, self.shared_slots, dim, dtype=torch.float32,
                                                    device=own.device) if split else None)
                if split:
                    shared_store[i][:, :, :shared].copy_(lead)
                self._broadcast(store[i][:, :, :width], own)
            if release:
                cache.release(i)
        self.first_logits.copy_(prompted.next_logits.repeat_interleave(self.rollouts, 0))
        self.first_pos.copy_(first)
        self.reset()

    def _broadcast(self, target: torch.Tensor, per_prompt: torch.Tensor) -> None:
        """Copy ``[P, ...]`` into ``target`` ``[P * rollouts, ...]``: each prompt to its rollouts."""
        target.view(self.prompts, self.rollouts, *target.shape[1:]).copy_(per_prompt.unsqueeze(1))

    # --- one step --------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the first token (drawn from the prompts' logits); the generator is re-seeded."""
        if self.generator is not None:
            self.generator.manual_seed(self.seed)
        token, entropy = self._choose(self.first_logits)
        self.tokens.zero_()
        self.entropies.zero_()
        self.tokens[:, 0], self.entropies[:, 0] = token, entropy
        self.token.copy_(token)
        self.done.copy_(self._is_stop(token))
        self.pos.copy_(self.first_pos)
        self.slot.zero_()

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of every row and the entropy (nats) of the distribution it came from."""
        if self.sample:
            logits = logits / self.temperature
        probs = torch.softmax(logits, -1)
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
        if not self.sample:
            return logits.argmax(-1), entropy
        # Gumbel-max: argmax(logits + G), G = -log(-log(U)), draws from softmax(logits) exactly.
        uniform = torch.rand(logits.shape, generator=self.generator, device=logits.device)
        return (logits - (-uniform.log()).log()).argmax(-1), entropy

    def _is_stop(self, token: torch.Tensor) -> torch.Tensor:
        return (token[:, None] == self.stop[None]).any(-1)

    # Gemma 3's attention modules call this with each layer's new key/value (one slot).
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        index = self.write_index[self.decoder.layer_types[layer_idx]]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, index, key_states.to(keys.dtype))
        values.index_copy_(2, index, value_states.to(values.dtype))
        return keys, values

    def _attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor, *, scaling: float, **_) -> tuple[torch.Tensor, None]:
        """Every layer's attention in a step, in float32: one new token per row over the row's own
        slots (``key``/``value``, masked by ``attention_mask``) and, on split layers, its group's
        shared slots, one softmax over both. Returns ``[rows, 1, heads, d]``, as SDPA's wrapper does."""
        rows, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        # Query head h reads key/value head h // per_kv, as Gemma 3's grouped-query attention does.
        q = query.float().reshape(rows, kv_heads, heads // kv_heads, dim) * scaling
        own = (q @ key.transpose(-1, -2)).masked_fill(~attention_mask, float("-inf"))
        shared_keys = self.shared_keys[module.layer_idx]
        if shared_keys is None:
            out = _weighted_values(own.softmax(-1), value)
        else:
            shared = self._by_row(self._by_group(q) @ shared_keys.transpose(-1, -2) + self.shared_bias)
            p_shared, p_own = torch.cat([shared, own], -1).softmax(-1).split([shared.shape[-1], own.shape[-1]], -1)
            out = _weighted_values(p_own, value) + self._by_row(
                _weighted_values(self._by_group(p_shared), self.shared_values[module.layer_idx]))
        return out.reshape(rows, 1, heads, dim).to(query.dtype), None

    def _by_group(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, kv, n, ...]`` to ``[groups, kv, rows of a group * n, ...]``."""
        rows, kv_heads, n, last = x.shape
        return (x.reshape(self.groups, rows // self.groups, kv_heads, n, last).transpose(1, 2)
                .reshape(self.groups, kv_heads, -1, last))

    def _by_row(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `_by_group`, for ``n`` = query heads per key/value head."""
        groups, kv_heads, n, last = x.shape
        per_kv = n * groups // self.rows
        return (x.reshape(groups, kv_heads, self.rows // groups, per_kv, last).transpose(1, 2)
                .reshape(self.rows, kv_heads, per_kv, last))

    def _step(self) -> None:
        """Feed the last token, draw the next one; every tensor here keeps its address."""
        decoder = self.decoder
        hidden = decoder.embed(self.token[:, None])
        q_pos = self.pos[:, None]
        self.write_index = {kind: self.write_at[kind] + self.slot for kind in self.kinds}
        masks, rope = {}, {}
        for kind in self.kinds:
            mask = self.kv_valid[kind] & (self.kv_pos[kind] <= q_pos)
            if kind not in self.split_kinds:
                mask = mask & (self.kv_pos[kind] > q_pos - decoder.window)
            masks[kind] = mask[:, None, None, :]
            rope[kind] = decoder.lm.rotary_emb(hidden, q_pos, kind)
        for i, layer in enumerate(decoder.lm.layers):
            kind = decoder.layer_types[i]
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=masks[kind], position_ids=q_pos,
                           cache=self, attend=self._attend)
        token, entropy = self._choose(decoder.logits(hidden[:, -1]))
        drawn = self.slot + 1
        self.tokens.index_copy_(1, drawn, token[:, None])
        self.entropies.index_copy_(1, drawn, entropy[:, None])
        self.done |= self._is_stop(token)
        self.token.copy_(token)
        self.pos.add_(1)
        self.slot.add_(1)

    def _capture(self) -> None:
        with torch.cuda.device(self.decoder.device):
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:  # each replay then draws fresh numbers from it
                graph.register_generator_state(self.generator)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(min(3, self.steps - 1)):  # warm-up (and compilation) outside the capture
                    self.step_fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.reset()
            with torch.cuda.graph(graph):
                self.step_fn()
        self.graph = graph
        self.reset()

    # --- decoding ----------------------------------------------------------------------------

    def run(self) -> Generated:
        """Decode from the first token: ``max_new_tokens`` per row, fewer once every row has
        stopped (checked every `STOP_CHECK_EVERY` tokens). Stop tokens and what follows are cut."""
        self.reset()
        drawn = 1
        while drawn < self.steps and not (drawn % STOP_CHECK_EVERY == 0 and bool(self.done.all())):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step_fn()
            drawn += 1
        tokens, entropies = [], []
        for row_tokens, row_entropies in zip(self.tokens[:, :drawn].tolist(), self.entropies[:, :drawn].tolist()):
            end = next((i for i, t in enumerate(row_tokens) if t in self.stop_ids), drawn)
            tokens.append(row_tokens[:end])
            entropies.append(row_entropies[:end])
        return Generated(tokens, entropies, drawn)


class KeptDecoders:
    """`StaticDecoder`s kept from one read to the next, one per batch layout (prompts, rollouts,
    temperature) for the `KEPT_LAYOUTS` used last: a read that fits its layout's buffers refills
    them; one that does not gets new ones (the old freed first). A server's reads mostly share their
    layout (the same rules), and so do its re-looks, so the buffers and the CUDA graph are made once
    rather than per read; capturing the graph took 0.5-2 s on an H200 (bench/RESULTS.md)."""

    def __init__(self, decoder: Gemma3Decoder, *, max_new_tokens: int, stop_ids: set[int]) -> None:
        self.decoder, self.max_new_tokens, self.stop_ids = decoder, max_new_tokens, frozenset(stop_ids)
        self.kept: OrderedDict[tuple, StaticDecoder] = OrderedDict()

    def decode(self, prompted: Prompted, *, rollouts: int, temperature: float = 0.0, seed: int = 0) -> Generated:
        """Decode every prompt ``rollouts`` times as one batch: sampled at ``temperature`` when
        ``rollouts > 1`` (and temperature > 0), greedy otherwise. Stops at a stop token or after
        ``max_new_tokens``; the stop token itself is not returned. Consumes ``prompted.cache``."""
        layout = (prompted.next_logits.shape[0], rollouts, temperature)
        static = self.kept.pop(layout, None)
        if static is not None and static.fits(prompted, rollouts=rollouts, temperature=temperature):
            static.load(prompted, release=True)
        else:
            static = None  # the old buffers go before new ones are made
            while len(self.kept) >= KEPT_LAYOUTS:
                self.kept.popitem(last=False)
            static = StaticDecoder(self.decoder, prompted, rollouts=rollouts, max_new_tokens=self.max_new_tokens,
                                   temperature=temperature, stop_ids=self.stop_ids, release=True)
        self.kept[layout] = static  # the most recently used last
        static.seed = seed  # `run` re-seeds the generator from it
        return static.run()


def decode(decoder: Gemma3Decoder, prompted: Prompted, *, rollouts: int, max_new_tokens: int,
           stop_ids: set[int], temperature: float = 0.0, seed: int = 0) -> Generated:
    """`KeptDecoders.decode` for a single read."""
    return KeptDecoders(decoder, max_new_tokens=max_new_tokens, stop_ids=stop_ids).decode(
        prompted, rollouts=rollouts, temperature=temperature, seed=seed)
