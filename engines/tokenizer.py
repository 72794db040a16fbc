"""Readout's word-level tokenizer for the report language, with box-coordinate tokens.

A finding is written as its sentence, then ``<box>`` and six coordinate tokens
``k0 r0 c0 k1 r1 c1`` (half-open bins of the normalized volume, ``<bin>`` .. ``<bin+63>``);
findings of one topic are separated by ``<sep>`` and the answer ends with ``<eos>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from engines.phantom import NORMAL_SENTENCES, QUESTIONS, TOPICS, VERTEBRAL_LEVELS

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<box>", "<unk>")
# The longest answer the model is trained on and asked for (two findings with boxes fit).
MAX_ANSWER_TOKENS = 72

# Every word the phantom truth, the topic prompts and the questions use (tests check coverage).
_WORDS = """
findings for topic : question
. , ( ) :
The the lungs are clear No no pleural effusion or pneumothorax Heart heart size is normal
pericardial liver unremarkable focal bone lesion
Cardiomegaly cardiothoracic ratio transverse cardiac diameter mm Pericardial effusion thick
Left Right left right deep solid nodule in mass upper middle lower lobe hypodense hepatic
lytic sclerotic vertebral body yes Is there a How many lung nodules are What of largest
"""

_TOKEN_RE = re.compile(r"\d+\.\d+|[A-Za-z]+\d*|\d+|[^\sA-Za-z\d]")


def split_words(text: str) -> list[str]:
    """Split a sentence into word tokens: decimals, words (``T7``), integers, punctuation."""
    return _TOKEN_RE.findall(text)


def _vocabulary(bins: int) -> list[str]:
    words: list[str] = []
    for text in (_WORDS, *NORMAL_SENTENCES.values(), *QUESTIONS, " ".join(TOPICS), " ".join(VERTEBRAL_LEVELS)):
        words.extend(split_words(text))
    words += [str(n) for n in range(0, 401)]
    words += [f"0.{n:02d}" for n in range(0, 100)]
    unique = list(dict.fromkeys(words))
    return [*SPECIALS, *unique, *(f"<{i}>" for i in range(bins))]


class Tokenizer:
    """Maps report text and boxes to token ids and back."""

    def __init__(self, bins: int = 64) -> None:
        self.bins = bins
        self.vocab = _vocabulary(bins)
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.pad, self.bos, self.eos, self.sep, self.box, self.unk = (self.index[s] for s in SPECIALS)
        self.first_bin = self.index["<0>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_text(self, text: str) -> list[int]:
        return [self.index.get(word, self.unk) for word in split_words(text)]

    def encode_box(self, box_bins: Sequence[int]) -> list[int]:
        """``<box>`` then the six bins; end bins are stored as their last bin (end - 1)."""
        k0, r0, c0, k1, r1, c1 = box_bins
        return [self.box, *(self.first_bin + b for b in (k0, r0, c0, k1 - 1, r1 - 1, c1 - 1))]

    def encode_answer(self, items: Sequence[tuple[str, Sequence[int] | None]]) -> list[int]:
        """Sentences with optional boxes, separated by ``<sep>``, ending with ``<eos>``."""
        ids: list[int] = []
        for i, (text, box) in enumerate(items):
            if i:
                ids.append(self.sep)
            ids += self.encode_text(text)
            if box is not None:
                ids += self.encode_box(box)
        return [*ids, self.eos]

    def is_bin(self, token: int) -> bool:
        return self.first_bin <= token < self.first_bin + self.bins

    def decode_text(self, ids: Sequence[int]) -> str:
        words = [self.vocab[i] for i in ids if i not in (self.pad, self.bos, self.eos) and not self.is_bin(i)]
        text = " ".join(words)
        text = re.sub(r" ([.,):?])", r"\1", text)
        return re.sub(r"\( ", "(", text)

    def decode_answer(self, ids: Sequence[int]) -> list[tuple[str, tuple[int, ...] | None]]:
        """Split generated ids into (sentence, half-open bin box or None) items.

        Stops at ``<eos>``; a malformed box (wrong count, end before start) is dropped.
        """
        items = []
        segment: list[int] = []
        for token in list(ids) + [self.eos]:
            if token in (self.sep, self.eos):
                if segment:
                    items.append(self._decode_item(segment))
                segment = []
                if token == self.eos:
                    break
            else:
                segment.append(token)
        return [item for item in items if item[0]]

    def _decode_item(self, segment: list[int]) -> tuple[str, tuple[int, ...] | None]:
        if self.box not in segment:
            return self.decode_text(segment), None
        cut = segment.index(self.box)
        text = self.decode_text(segment[:cut])
        bins = [t - self.first_bin for t in segment[cut + 1 :] if self.is_bin(t)]
        if len(bins) != 6:
            return text, None
        k0, r0, c0, k1, r1, c1 = bins
        if k1 < k0 or r1 < r0 or c1 < c0:
            return text, None
        return text, (k0, r0, c0, k1 + 1, r1 + 1, c1 + 1)

    def topic_prompt(self, topic: str) -> list[int]:
        return [self.bos, *self.encode_text(f"findings for topic : {topic}")]

    def question_prompt(self, question: str) -> list[int]:
        return [self.bos, *self.encode_text(f"question : {question}")]
