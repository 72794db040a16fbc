"""Batched sampling from the demo model with a KV cache and a box grammar.

All sequences (topics x rollouts, questions x rollouts) step together; the grammar is applied
as tensor masks, so there is no per-sequence Python work inside the loop: after ``<box>`` exactly
six coordinate tokens follow, each end coordinate no smaller than its start, and coordinate
tokens appear nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.model import Prefix, ReadoutVLM
from engines.tokenizer import MAX_ANSWER_TOKENS, Tokenizer


@dataclass
class Generation:
    tokens: torch.Tensor  # [S, L] generated ids, <pad> after <eos>
    entropy: torch.Tensor  # [S, L] entropy (nats) of the next-token distribution at each step
    is_coordinate: torch.Tensor  # [S, L] True where a coordinate token was generated

    def coordinate_entropies(self, row: int) -> list[float]:
        """Entropies of row ``row``'s coordinate tokens in order (six per box)."""
        return self.entropy[row][self.is_coordinate[row]].tolist()


@torch.no_grad()
def generate(model: ReadoutVLM, prefix: Prefix, tokenizer: Tokenizer, max_new: int = MAX_ANSWER_TOKENS, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> Generation:
    """Sample up to ``max_new`` tokens for every row of ``prefix`` (greedy when temperature is 0)."""
    rows = prefix.logits.shape[0]
    device = prefix.logits.device
    vocab = prefix.logits.shape[-1]
    is_bin = torch.zeros(vocab, dtype=torch.bool, device=device)
    is_bin[tokenizer.first_bin : tokenizer.first_bin + tokenizer.bins] = True
    never = torch.zeros(vocab, dtype=torch.bool, device=device)
    never[[tokenizer.pad, tokenizer.bos, tokenizer.unk]] = True
    bin_index = torch.arange(vocab, device=device) - tokenizer.first_bin

    box_left = torch.zeros(rows, dtype=torch.long, device=device)  # coordinates still owed
    starts = torch.zeros(rows, 3, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, entropies, coordinates = [], [], []
    logits = prefix.logits
    for _ in range(max_new):
        in_box = box_left > 0
        allowed = ~never[None].expand(rows, -1) & (in_box[:, None] == is_bin[None])
        # End coordinates (the last three) may not precede their starts.
        end_axis = (3 - box_left).clamp(min=0, max=2)
        floor = torch.where(box_left <= 3, starts.gather(1, end_axis[:, None]).squeeze(1), torch.zeros_like(box_left))
        allowed &= ~(is_bin[None] & (bin_index[None] < floor[:, None]) & in_box[:, None])
        logits = logits.float().masked_fill(~allowed, float("-inf"))
        logp = logits.log_softmax(-1)
        entropies.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))
        if temperature > 0:
            choice = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        else:
            choice = logits.argmax(-1)
        choice = torch.where(finished, torch.full_like(choice, tokenizer.pad), choice)
        coordinates.append(in_box & ~finished)
        tokens.append(choice)

        # Advance the grammar: <box> opens six coordinates; the first three are the starts.
        position = 6 - box_left
        record = in_box & (position < 3)
        starts[record, position[record]] = choice[record] - tokenizer.first_bin
        box_left = torch.where(in_box, box_left - 1, torch.where(choice == tokenizer.box, 6, 0))
        finished |= choice == tokenizer.eos
        if bool(finished.all()):
            break
        logits = model.extend(prefix, choice[:, None])[:, -1]
    return Generation(torch.stack(tokens, 1), torch.stack(entropies, 1), torch.stack(coordinates, 1))
