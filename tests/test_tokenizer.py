"""The report-language tokenizer covers every phantom sentence and round-trips boxes."""

from __future__ import annotations

import pytest

from engines.phantom import QUESTIONS, render_phantom
from engines.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_every_phantom_sentence_round_trips(tokenizer):
    texts = set(QUESTIONS)
    for seed in range(12):
        truth = render_phantom(seed).truth
        texts |= {t.text for t in truth.topics if t.text}
        texts |= {f.text for t in truth.topics for f in t.findings}
        texts |= {a.answer for a in truth.answers}
    for text in texts:
        ids = tokenizer.encode_text(text)
        assert tokenizer.unk not in ids, text
        assert tokenizer.decode_text(ids) == text


def test_answer_with_boxes_round_trips(tokenizer):
    items = [("12 mm solid nodule in the right upper lobe.", (3, 10, 20, 9, 14, 25)),
             ("Left pleural effusion, 30 mm deep.", (0, 40, 5, 12, 63, 30))]
    ids = tokenizer.encode_answer(items)
    assert ids[-1] == tokenizer.eos and ids.count(tokenizer.sep) == 1
    assert tokenizer.decode_answer(ids) == items


def test_malformed_box_is_dropped_not_raised(tokenizer):
    ids = tokenizer.encode_text("12 mm solid nodule in the right upper lobe.") + [tokenizer.box, tokenizer.first_bin + 5]
    assert tokenizer.decode_answer(ids + [tokenizer.eos]) == [("12 mm solid nodule in the right upper lobe.", None)]
    backwards = tokenizer.encode_text("5 mm mass in the left lower lobe.") + [tokenizer.box] + [tokenizer.first_bin + b for b in (9, 0, 0, 3, 5, 5)]
    assert tokenizer.decode_answer(backwards) == [("5 mm mass in the left lower lobe.", None)]


def test_prompts_name_their_topic_or_question(tokenizer):
    assert tokenizer.decode_text(tokenizer.topic_prompt("lungs")) == "findings for topic: lungs"
    assert tokenizer.decode_text(tokenizer.question_prompt(QUESTIONS[0])) == f"question: {QUESTIONS[0]}"
