"""A tiny random MedGemma-shaped checkpoint for CPU tests (nothing is downloaded).

`save_tiny_medgemma` writes what a real ``google/medgemma-1.5-4b-it`` folder holds (config,
safetensors weights, tokenizer, processor with chat template) at toy sizes, so the tests load
it through `engines.medgemma.load_medgemma`, the same path a real checkpoint takes. The
architecture is the real one (Gemma 3 decoder with sliding and full layers, SigLIP vision
tower, pooled projector); the tokenizer is word level, built from the words Readout's prompts
use, with Gemma's special tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
    TokenizersBackend,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import (
    Gemma3ImageProcessorPil,
)

from engines.medgemma import INSTRUCTION, question_prompt, topic_question
from engines.phantom import FINDING_TYPES, NORMAL_SENTENCES, QUESTIONS, TOPICS

VOCAB_SIZE = 300
IMAGE_SIZE = 64
TOKENS_PER_IMAGE = 4
SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<unused94>", "<unused95>",
)
# Gemma 3's chat template (text items are trimmed; an image item becomes <start_of_image>).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])


def _words() -> list[str]:
    texts = [INSTRUCTION, "user model SLICE json label slice yes no left right upper lower lobe mm"]
    texts += [topic_question(t) for t in TOPICS] + [question_prompt(q) for q in QUESTIONS]
    texts += list(NORMAL_SENTENCES.values()) + [" ".join(kinds) for kinds in FINDING_TYPES.values()]
    words = set("0123456789")
    for text in texts:
        words.update(piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text.replace("box_2d", " ")))
    return sorted(words)


def build_tokenizer() -> TokenizersBackend:
    """Word-level tokenizer: Gemma's special tokens first (pad 0, eos 1, bos 2), then the words."""
    words = _words()
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "box_2d", *words])}
    if len(vocab) > VOCAB_SIZE:
        raise RuntimeError(f"tiny vocabulary has {len(vocab)} tokens, more than {VOCAB_SIZE}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken("box_2d", special=False, normalized=False)])  # one token, not box _ 2 d
    return TokenizersBackend(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )


def build_tiny_model(tokenizer: TokenizersBackend, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma 3 + SigLIP at toy sizes: 4 decoder layers (3 sliding, 1 full), 4 tokens per image."""
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Gemma 3 initializes the projector to zeros, which would make every image token the
        # same; random weights make the image content matter (and pruning scores differ).
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = [1, ids("<end_of_turn>")]
    model.generation_config.pad_token_id = 0
    return model


def save_tiny_medgemma(folder: Path) -> Path:
    """Write a tiny random MedGemma-shaped checkpoint (model, tokenizer, processor) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=TOKENS_PER_IMAGE,
    )
    build_tiny_model(tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
