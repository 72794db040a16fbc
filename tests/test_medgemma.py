"""MedGemma adapter on CPU: preprocessing, prompts, answer parsing, boxes, loading, the shared
prefix cache, pruning and the engine, against a tiny random checkpoint (tests/tiny_gemma.py)."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.errors import CheckpointError
from engines.gemma_pixels import PixelSteps
from engines.medgemma import (
    INSTRUCTION,
    MedGemmaEngine,
    ParsedAnswer,
    Rollout,
    Sampled,
    SliceLayout,
    box_to_voxels,
    build_messages,
    ct_slice_to_rgb,
    load_medgemma,
    pad_to_square,
    parse_answer,
    question_prompt,
    select_slice_indices,
    topic_question,
)
from engines.medgemma_decode import SLOT_CHUNK, STOP_CHECK_EVERY, StaticDecoder, decode
from engines.medgemma_pruning import (
    PruningConfig,
    TokenCache,
    keep_tokens,
    normalized,
    prefill_prefix,
    prefill_prompts,
    saliency,
)
from engines.phantom import QUESTIONS
from engines.report import ReadRequest
from engines.results import StudyResult
from engines.volume import Volume
from tests.tiny_gemma import TOKENS_PER_IMAGE


@pytest.fixture(scope="session")
def tiny(tiny_folder: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a real download attempt would fail, not hang
        return load_medgemma(tiny_folder)


@pytest.fixture(scope="session")
def engine(tiny) -> MedGemmaEngine:
    model, processor = tiny
    return MedGemmaEngine(model, processor, max_new_tokens=8)


def _hu(slices: int = 5, rows: int = 40, cols: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, size=(slices, rows, cols)).astype(np.int16)


def _volume(hu: np.ndarray) -> Volume:
    n = hu.shape[0]
    return Volume(hu=hu, affine=np.eye(4), sop_instance_uids=tuple(f"1.2.826.0.1.3680043.8.498.{k + 1}" for k in range(n)),
                  frame_numbers=(None,) * n, sources=(), study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
                  frame_of_reference_uid="1.2.3.5")


# --- preprocessing -------------------------------------------------------------------------


def test_all_slices_up_to_the_limit():
    assert select_slice_indices(1) == [0]
    assert select_slice_indices(85) == list(range(85))
    assert select_slice_indices(4, max_slices=4) == [0, 1, 2, 3]


def test_slice_selection_follows_the_official_rule():
    # i / 4 * 9 = 2.25, 4.5, 6.75, 9 -> Python's round: 2, 4 (half to even), 7, 9
    assert select_slice_indices(10, max_slices=4) == [2, 4, 7, 9]
    chosen = select_slice_indices(200)
    assert len(chosen) == 85 and chosen[0] == 2 and chosen[-1] == 199  # skips 0, keeps the last
    assert all(b > a for a, b in itertools.pairwise(chosen))


@pytest.mark.parametrize("n, limit", [(0, 85), (-3, 85), (2.5, 85), (True, 85), (10, 0)])
def test_slice_selection_rejects_bad_counts(n, limit):
    with pytest.raises(ValueError, match="positive integer"):
        select_slice_indices(n, limit)


def test_windows_by_hand():
    hu = np.array([[-2000, -1024, 0], [40, 215, 3000]], dtype=np.int16)
    rgb = ct_slice_to_rgb(hu)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    # R (-1024, 1024): 0 -> 1024/2048*255 = 127.5 -> 128; 40 -> 132.47; 215 -> 154.27
    assert rgb[..., 0].tolist() == [[0, 0, 128], [132, 154, 255]]
    # G (-135, 215): 0 -> 135/350*255 = 98.36; 40 -> 175/350*255 = 127.5 -> 128
    assert rgb[..., 1].tolist() == [[0, 0, 98], [128, 255, 255]]
    # B (0, 80): 40 -> 127.5 -> 128
    assert rgb[..., 2].tolist() == [[0, 0, 0], [128, 255, 255]]


def test_windows_need_one_slice():
    with pytest.raises(ValueError, match="2D"):
        ct_slice_to_rgb(np.zeros((2, 3, 4)))


def test_pad_to_square_centres_the_image():
    rgb = np.full((3, 6, 3), 7, dtype=np.uint8)
    square, (top, left) = pad_to_square(rgb)
    assert square.shape == (6, 6, 3) and (top, left) == (1, 0)
    assert (square[1:4] == 7).all() and (square[0] == 0).all() and (square[4:] == 0).all()
    square, (top, left) = pad_to_square(np.ones((5, 2, 3), dtype=np.uint8))
    assert square.shape == (5, 5, 3) and (top, left) == (0, 1) and square[:, 1:3].all() and not square[:, 0].any()


# --- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [40, 100])  # the tiny processor's 64 px: enlarged and reduced
def test_pixels_are_the_processors_to_one_level(tiny, side):
    image_processor = tiny[1].image_processor
    rng = np.random.default_rng(side)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(3)]
    ours = PixelSteps.of(image_processor)(images, torch.device("cpu"))
    theirs = image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, 64, 64) and ours.dtype == torch.float32
    level = image_processor.rescale_factor / min(image_processor.image_std)  # one of 255 steps, normalized
    assert float((ours - theirs).abs().max()) <= level * 1.001


def test_image_processor_settings_readout_does_not_reproduce_are_named(tiny):
    image_processor = copy.deepcopy(tiny[1].image_processor)
    image_processor.resample, image_processor.do_normalize = 3, False
    with pytest.raises(ValueError, match="do_normalize, resample"):
        PixelSteps.of(image_processor)


def test_message_layout():
    [turn] = build_messages(3, "Is there a nodule?")
    assert turn["role"] == "user"
    content = turn["content"]
    assert content[0] == {"type": "text", "text": INSTRUCTION}
    assert [c["type"] for c in content[1:7]] == ["image", "text"] * 3
    assert [c["text"] for c in content[2:7:2]] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert content[-1] == {"type": "text", "text": "Is there a nodule?"}
    with pytest.raises(ValueError):
        build_messages(0, "q")
    with pytest.raises(ValueError):
        build_messages(2, "  ")


def test_topic_and_question_prompts_ask_for_boxes():
    prompt = topic_question("liver")
    assert "liver" in prompt and "box_2d" in prompt and "0-1000" in prompt and "SLICE" in prompt
    assert question_prompt(QUESTIONS[0]).startswith(QUESTIONS[0])
    with pytest.raises(ValueError):
        topic_question("")


def test_prompt_layouts_are_tokenized_once_and_kept(tiny, monkeypatch):
    import engines.medgemma as medgemma_module

    engine = MedGemmaEngine(*tiny, max_new_tokens=8)
    calls = []
    tokenize = engine._tokenize
    monkeypatch.setattr(engine, "_tokenize", lambda messages: calls.append(1) or tokenize(messages))
    monkeypatch.setattr(medgemma_module, "PROMPT_LAYOUTS_KEPT", 2)
    questions = [topic_question("lungs"), question_prompt(QUESTIONS[0])]
    first = engine.prompt_ids(4, questions)
    first[0].append(-1)  # a caller's change to what it got does not reach the kept layout
    assert engine.prompt_ids(4, questions) != first and len(calls) == 3  # two prompts and the bare prefix
    engine.prompt_ids(5, questions)
    engine.prompt_ids(6, questions)  # the third layout: the least recently used one (4 slices) goes
    assert len(calls) == 9
    engine.prompt_ids(4, questions)
    assert len(calls) == 12


def test_prompt_tokens_match_the_processor(engine, tiny):
    _, processor = tiny
    _, images = engine.prepare(_hu(slices=3))
    questions = [topic_question("lungs"), question_prompt(QUESTIONS[0])]
    prefix, own = engine.prompt_ids(len(images), questions)
    tok = processor.tokenizer
    image_id, boi, eoi = (tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>"))
    assert prefix.count(image_id) == 3 * TOKENS_PER_IMAGE and prefix.count(boi) == 3 == prefix.count(eoi)
    slice_id = tok.convert_tokens_to_ids("SLICE")
    # Order: <boi> 4 x image <eoi> SLICE n, three times, all in the shared prefix.
    for n, start in enumerate(i for i, t in enumerate(prefix) if t == boi):
        assert prefix[start + 1 : start + 1 + TOKENS_PER_IMAGE] == [image_id] * TOKENS_PER_IMAGE
        assert prefix[start + 1 + TOKENS_PER_IMAGE] == eoi
        assert prefix[start + 2 + TOKENS_PER_IMAGE] == slice_id
        assert tok.decode([prefix[start + 3 + TOKENS_PER_IMAGE]]) == str(n + 1)
    # The notebook's path: the processor's chat template with the images in the messages.
    for question, ids in zip(questions, own):
        messages = build_messages(3, question)
        pictures = iter(images)
        for item in messages[0]["content"]:
            if item["type"] == "image":
                item["image"] = Image.fromarray(next(pictures))
        reference = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
        assert reference["input_ids"][0].tolist() == prefix + ids
        assert reference["token_type_ids"][0].tolist() == [int(t == image_id) for t in prefix + ids]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference["pixel_values"])


# --- answers -------------------------------------------------------------------------------


def test_fenced_json_answer():
    text = ('A nodule in the right lung.\n```json\n[{"box_2d": [100, 200, 300, 400], "label": "nodule", '
            '"slice": 3}]\n```')
    parsed = parse_answer(text)
    assert parsed.error is None and parsed.text == "A nodule in the right lung."
    [box] = parsed.boxes
    assert box.box_2d == (100, 200, 300, 400) and box.label == "nodule" and box.slice == 3 and box.problem is None
    assert text[box.span[0] : box.span[1]] == '"box_2d": [100, 200, 300, 400]'


def test_thought_trace_is_stripped():
    text = '<unused94>thought\nmaybe [{"box_2d": [1, 2, 3, 4], "slice": 1}]<unused95>The lungs are clear.'
    assert parse_answer(text) == ParsedAnswer("The lungs are clear.", (), None, thought=True)
    text = '<unused94>x<unused95>Nodule. [{"box_2d": [1, 2, 3, 4], "slice": 1}]'
    [box] = parse_answer(text).boxes
    assert text[box.span[0] : box.span[1]] == '"box_2d": [1, 2, 3, 4]'  # spans index the raw text


def test_unfinished_thought_trace_is_an_error():
    parsed = parse_answer("<unused94>thought\nstill thinking about [1, 2")
    assert parsed.text == "" and not parsed.boxes and "never ended" in parsed.error


def test_answer_without_json_is_not_an_error():
    parsed = parse_answer("No pleural effusion.<end_of_turn>")
    assert parsed.text == "No pleural effusion." and parsed.boxes == () and parsed.error is None


def test_bare_json_and_slice_labels():
    text = 'Mass. [{"box_2d": [10, 10, 20, 20], "label": "mass", "slice": "SLICE 2"}] That is all.'
    parsed = parse_answer(text)
    assert parsed.text == "Mass. That is all." and parsed.error is None
    assert parsed.boxes[0].slice == 2 and parsed.boxes[0].label == "mass"
    assert parse_answer("There is [1] nodule.").boxes == ()  # a bracket in prose is not a box


@pytest.mark.parametrize("text, message", [
    ('Nodule.\n```json\n[{"box_2d": [1, 2, 3}]\n```', "malformed JSON"),
    ('Nodule. ```json\n[{"box_2d": [1, 2', "unterminated"),
    ('Nodule. [{"box_2d": [1, 2, 3], "slice": 1}]', "4 numbers"),
    ('Nodule. [{"box_2d": [1, 2, 3, "x"], "slice": 1}]', "4 numbers"),
    ('Nodule. {"box_2d": oops}', "not in valid JSON"),
    ('[{"box_2d": [1, 2, 3, 4], "slice": "top"}]', "not a SLICE number"),
])
def test_malformed_answers_are_recorded(text, message):
    parsed = parse_answer(text)
    assert message in parsed.error
    assert parsed.text.startswith("Nodule.") or parsed.text == ""


def test_bad_items_are_skipped_and_reported():
    parsed = parse_answer('[{"box_2d": [1, 2, 3, 4], "slice": 1}, {"label": "x"}, 5]')
    assert len(parsed.boxes) == 1 and "item 1" in parsed.error and "item 2" in parsed.error
    assert parse_answer(None).error.startswith("model output is not text")


@pytest.mark.parametrize("box, problem", [([0, 0, 1200, 500], "outside the 0-1000"), ([300, 0, 100, 500], "inverted"),
                                          ([100, 50, 200, 50], "inverted")])
def test_out_of_range_and_inverted_boxes(box, problem):
    parsed = parse_answer(json.dumps([{"box_2d": box, "slice": 1}]))
    assert problem in parsed.boxes[0].problem
    with pytest.raises(ValueError, match=problem):
        box_to_voxels(box, 1, [0, 5], (40, 80), (20, 0), 80, 10)


# --- boxes ---------------------------------------------------------------------------------


def test_box_to_voxels_by_hand():
    # 20 slices of 40 x 80, padded to 80 x 80 with 20 rows on top; SLICE 1..4 are k 0, 5, 10, 15.
    args = ([0, 5, 10, 15], (40, 80), (20, 0), 80, 20)
    # y 250..500 -> padded rows 20..40 -> image rows 0..20; x 100..200 -> columns 8..16
    assert box_to_voxels([250, 100, 500, 200], 2, *args) == (5, 0, 8, 10, 20, 16)
    assert box_to_voxels([250, 100, 500, 200], 4, *args) == (15, 0, 8, 20, 20, 16)  # last: to the end
    assert box_to_voxels([0, 0, 1000, 1000], 1, *args) == (0, 0, 0, 5, 40, 80)  # clipped to the slice
    # 0.1 of a padded pixel still claims that pixel: rounding goes outwards
    assert box_to_voxels([251, 101, 499.9, 199.9], 1, *args) == (0, 0, 8, 5, 20, 16)
    assert box_to_voxels([500, 500, 600, 600], 5, list(range(5)), (10, 10), (0, 0), 10, 5) == (4, 5, 5, 5, 6, 6)


@pytest.mark.parametrize("box, slice_number, message", [
    ([0, 0, 200, 1000], 1, "padding"),
    ([250, 100, 500, 200], 0, "SLICE 1..4"),
    ([250, 100, 500, 200], 5, "SLICE 1..4"),
    ([250, 100, 500, 200], None, "no slice"),
    ([250, 100, 500], 1, "4 numbers"),
])
def test_box_to_voxels_refuses(box, slice_number, message):
    with pytest.raises(ValueError, match=message):
        box_to_voxels(box, slice_number, [0, 5, 10, 15], (40, 80), (20, 0), 80, 20)


# --- loading -------------------------------------------------------------------------------


def _copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


@pytest.mark.parametrize("drop, expected", [
    (("config.json",), "missing config.json"),
    (("model.safetensors",), "the *.safetensors weights"),
    (("tokenizer.json",), "tokenizer files"),
    (("processor_config.json",), "processor files"),
])
def test_incomplete_checkpoint_says_what_is_expected(tiny_folder, tmp_path, drop, expected):
    folder = _copy_without(tiny_folder, tmp_path / "ckpt", *drop)
    with pytest.raises(CheckpointError) as error:
        load_medgemma(folder)
    message = str(error.value)
    assert expected in message and "google/medgemma-1.5-4b-it" in message
    assert "Health AI Developer Foundations" in message and "never downloads" in message


def test_missing_or_foreign_checkpoint(tiny_folder, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_medgemma(tmp_path / "nowhere")
    folder = _copy_without(tiny_folder, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not Gemma 3"):
        load_medgemma(folder)


# --- shared prefix and pruning -------------------------------------------------------------


GREEDY_TOKENS = 24  # past the tiny model's sliding window (16) and the first stop check


@pytest.fixture(scope="module")
def prompt_case(engine, tiny):
    """Three prompts of different lengths on 5 slices, with the full forward's next-token logits
    and HF ``generate``'s greedy tokens and per-step logits."""
    model, processor = tiny
    _, images = engine.prepare(_hu(slices=5))
    questions = [question_prompt(QUESTIONS[1]), topic_question("heart"), question_prompt(QUESTIONS[0])]
    prefix, own = engine.prompt_ids(len(images), questions)
    assert len(set(map(len, own))) == 3  # so the batch has padding
    references, greedy, step_logits = [], [], []
    with torch.no_grad():
        for question in questions:
            text = processor.apply_chat_template(build_messages(5, question), add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[text], images=[images], return_tensors="pt")
            # The processor's own pixels (the engine's agree to one level: test_pixels_are_the_processors...).
            features = engine.decoder.image_features(inputs["pixel_values"])
            references.append(model(**inputs).logits[0, -1])
            out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                 output_logits=True, return_dict_in_generate=True)
            greedy.append(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
            step_logits.append(torch.stack([logits[0] for logits in out.logits]))
    return engine.decoder, prefix, own, features, references, greedy, step_logits


def _prefill(case, pruning: PruningConfig | None = None, prompts: list[int] | None = None):
    decoder, prefix_ids, own, features, *_ = case
    own = own if prompts is None else [own[i] for i in prompts]
    layer = pruning.layer_for(decoder.num_layers) if pruning and pruning.active else None
    with torch.no_grad():
        prefix = prefill_prefix(decoder, torch.tensor(prefix_ids), features, layer)
        return prefill_prompts(decoder, prefix, own, pruning)


def test_prefix_cache_gives_the_full_forward_logits(prompt_case):
    prompted = _prefill(prompt_case)
    for row, reference in enumerate(prompt_case[4]):
        torch.testing.assert_close(prompted.next_logits[row], reference, atol=1e-4, rtol=0)
    assert prompted.kept_ratio is None


def test_image_tokens_attend_both_ways(prompt_case, monkeypatch):
    import engines.medgemma_pruning as pruning_module

    monkeypatch.setattr(pruning_module, "image_blocks", lambda is_image: torch.full(is_image.shape, -1))
    causal_only = _prefill(prompt_case)  # what dropping token_type_ids would do
    assert not torch.allclose(causal_only.next_logits[0], prompt_case[4][0], atol=1e-4)


@pytest.mark.parametrize("pruning", [None, PruningConfig("ratio", 0.5)])
def test_a_long_prefill_attends_chunk_by_chunk_to_what_each_chunk_reaches(prompt_case, monkeypatch, pruning):
    import engines.medgemma_pruning as pruning_module

    whole = _prefill(prompt_case, pruning)
    calls, sdpa = [], pruning_module.sdpa_attention_forward

    def spy(module, query, key, *args, **kwargs):
        calls.append((module.is_sliding, query.shape[2], key.shape[2]))
        return sdpa(module, query, key, *args, **kwargs)

    monkeypatch.setattr(pruning_module, "sdpa_attention_forward", spy)
    monkeypatch.setattr(pruning_module, "PREFILL_CHUNK", 16)
    chunked = _prefill(prompt_case, pruning)
    torch.testing.assert_close(chunked.next_logits, whole.next_logits, atol=1e-4, rtol=0)
    window, context = prompt_case[0].window, whole.cache.length
    assert max(q for _, q, _ in calls) <= 16  # the prefix ran in chunks (the prompts' own rows are short)
    # A sliding layer's chunk reaches back one window (and to the end of an image it is in), not to the start.
    assert max(k for sliding, q, k in calls if sliding and q == 16) <= 16 + window + 16
    assert any(k < context / 2 for sliding, q, k in calls if not sliding and q == 16)  # causal: the first chunks


def test_the_prompts_attend_on_sliding_layers_only_to_the_window_they_reach(prompt_case, monkeypatch):
    import engines.medgemma_pruning as pruning_module

    decoder, prefix_ids, own, features, *_ = prompt_case
    with torch.no_grad():
        prefix = prefill_prefix(decoder, torch.tensor(prefix_ids), features)
    calls, chunked = [], pruning_module._chunked_attention

    def spy(spans, cache, module, *args, **kwargs):
        calls.extend((module.is_sliding, k1 - k0) for _, _, k0, k1 in spans)
        return chunked(spans, cache, module, *args, **kwargs)

    monkeypatch.setattr(pruning_module, "_chunked_attention", spy)
    with torch.no_grad():
        prompted = prefill_prompts(decoder, prefix, own)
    assert prefix.length > 2 * decoder.window  # so that reaching the whole cache would show
    # Global layers see every slot; a sliding layer's first prompt token reaches one window back.
    assert {k for sliding, k in calls if not sliding} == {prompted.cache.length}
    assert max(k for sliding, k in calls if sliding) == decoder.window - 1 + max(map(len, own))


def test_the_prompts_hold_the_prefix_once(prompt_case):
    prompted = _prefill(prompt_case)
    cache, prefix_length, longest = prompted.cache, len(prompt_case[1]), max(map(len, prompt_case[2]))
    assert cache.shared == prompted.shared_slots == prefix_length and cache.rows == 3
    assert all(k.shape[0] == 1 and k.shape[2] == prefix_length for k in cache.shared_keys + cache.shared_values)
    assert all(k.shape[0] == 3 and k.shape[2] == longest for k in cache.keys + cache.values)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), -1)
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


@pytest.mark.parametrize("pruning", [None, PruningConfig("ratio", 1.0)])
def test_batched_decoding_matches_generate(prompt_case, pruning):
    # Keeping every image token runs the pruning path (scoring, gathered cache) and must change nothing.
    prompted = _prefill(prompt_case, pruning)
    with torch.no_grad():
        out = decode(prompt_case[0], prompted, rollouts=1, max_new_tokens=GREEDY_TOKENS, stop_ids=set())
    assert out.tokens == prompt_case[5] and out.steps == GREEDY_TOKENS
    for row, logits in enumerate(prompt_case[6]):
        torch.testing.assert_close(torch.tensor(out.entropies[row]), _entropy(logits), atol=1e-5, rtol=0)
    assert all(k is None for k in prompted.cache.keys)  # decode consumed the prompted cache


def test_pruned_rows_decode_as_each_prompt_alone(prompt_case):
    # Pruned rows keep different slots (holes, padding); batched they must decode as they do alone.
    pruning = PruningConfig("ratio", 0.5)
    with torch.no_grad():
        batched = decode(prompt_case[0], _prefill(prompt_case, pruning), rollouts=1, max_new_tokens=GREEDY_TOKENS,
                         stop_ids=set())
        for row in range(3):
            alone = decode(prompt_case[0], _prefill(prompt_case, pruning, [row]), rollouts=1,
                           max_new_tokens=GREEDY_TOKENS, stop_ids=set())
            assert alone.tokens[0] == batched.tokens[row]
            torch.testing.assert_close(torch.tensor(alone.entropies[0]), torch.tensor(batched.entropies[row]),
                                       atol=1e-5, rtol=0)
    assert batched.tokens != prompt_case[5]  # pruning half the image tokens does change the answers


@pytest.mark.parametrize("pruning", [None, PruningConfig("ratio", 0.5)])
def test_buffers_hold_the_window_on_sliding_layers_and_the_prefix_once_on_global_ones(prompt_case, pruning):
    decoder = prompt_case[0]
    prompted = _prefill(prompt_case, pruning)
    context, own = prompted.cache.length, max(len(p) for p in prompt_case[2])
    with torch.no_grad():
        static = StaticDecoder(decoder, prompted, rollouts=2, max_new_tokens=10)
    assert static.rows == 6 and static.graph is None and static.capture_error is None  # CPU: eager steps
    assert set(decoder.layer_types) == {"sliding_attention", "full_attention"}
    assert context > 2 * decoder.window  # the prefix is much longer than the window
    # Unpruned, the prefix is the same in every row: kept once. A per-prompt keep: once per prompt.
    groups, shared = (1, context - own) if pruning is None else (3, context)
    assert prompted.shared_slots == (context - own if pruning is None else 0)
    def padded(slots: int) -> int:  # buffers come in whole chunks of slots
        return -(-slots // SLOT_CHUNK) * SLOT_CHUNK

    for kind, keys, values, shared_keys in zip(decoder.layer_types, static.keys, static.values, static.shared_keys):
        assert keys.shape == values.shape and keys.shape[0] == 6
        if kind == "sliding_attention":  # the context's slots, then the 10 new ones
            assert keys.shape[2] <= padded(padded(decoder.window) + 10) and shared_keys is None
        else:
            assert keys.shape[2] == padded(padded(context - shared) + 10)
            assert shared_keys.shape[:3] == (groups, keys.shape[1], padded(shared))


def test_a_prefix_kept_once_decodes_as_a_copy_per_prompt(prompt_case):
    prompted = _prefill(prompt_case)
    with torch.no_grad():
        once = StaticDecoder(prompt_case[0], prompted, rollouts=2, max_new_tokens=6)
        per_prompt = StaticDecoder(prompt_case[0], replace(prompted, shared_slots=0), rollouts=2, max_new_tokens=6)
        ours, theirs = once.run(), per_prompt.run()
    assert (once.groups, per_prompt.groups) == (1, 3)
    assert ours.tokens == theirs.tokens == [t[:6] for t in prompt_case[5] for _ in range(2)]
    torch.testing.assert_close(torch.tensor(ours.entropies), torch.tensor(theirs.entropies), atol=1e-5, rtol=0)


def test_a_graph_that_cannot_be_captured_falls_back_to_eager_steps(prompt_case):
    with torch.no_grad():
        static = StaticDecoder(prompt_case[0], _prefill(prompt_case), max_new_tokens=6, graph=True)
        out = static.run()
    assert static.graph is None and static.capture_error  # no CUDA here: the reason is kept
    assert out.tokens == [t[:6] for t in prompt_case[5]]


def test_sampled_decoding_is_seeded(prompt_case):
    def sample(seed: int, rollouts: int = 3, temperature: float = 1.0):
        with torch.no_grad():
            return decode(prompt_case[0], _prefill(prompt_case), rollouts=rollouts, max_new_tokens=8, stop_ids=set(),
                          temperature=temperature, seed=seed)

    first, again, other = sample(1), sample(1), sample(2)
    assert len(first.tokens) == 9 and all(len(t) == 8 for t in first.tokens)
    assert first == again
    assert first.tokens != other.tokens
    assert len({tuple(t) for t in first.tokens[:3]}) > 1  # rollouts of one prompt differ
    assert first.tokens != [t for t in prompt_case[5] for _ in range(3)]  # not greedy
    greedy = sample(1, temperature=0.0)  # temperature 0: every rollout is the greedy answer
    assert greedy.tokens == [t[:8] for t in prompt_case[5] for _ in range(3)]


def test_decoding_stops_at_stop_tokens(prompt_case):
    greedy = prompt_case[5]
    with torch.no_grad():
        # Each row's own third token stops it: two tokens survive, the rest is cut.
        out = decode(prompt_case[0], _prefill(prompt_case), rollouts=1, max_new_tokens=8, stop_ids={t[2] for t in greedy})
        for row, tokens in enumerate(out.tokens):
            end = next(i for i, t in enumerate(greedy[row]) if t in {g[2] for g in greedy})
            assert tokens == greedy[row][:end] and len(out.entropies[row]) == end <= 2
        # Every row stops at once: decoding ends at the first stop check, not after 40 tokens.
        out = decode(prompt_case[0], _prefill(prompt_case), rollouts=1, max_new_tokens=40,
                     stop_ids={t[0] for t in greedy})
    assert out.tokens == [[], [], []] and out.steps == STOP_CHECK_EVERY
    assert 2 <= STOP_CHECK_EVERY < 40  # the host does not wait on the device every step


def test_pruning_that_keeps_everything_changes_nothing(prompt_case):
    prompted = _prefill(prompt_case, PruningConfig("ratio", 1.0))
    assert prompted.kept_ratio == [1.0, 1.0, 1.0]
    for row, reference in enumerate(prompt_case[4]):
        torch.testing.assert_close(prompted.next_logits[row], reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pruning, share", [(PruningConfig("ratio", 0.5), 0.5), (PruningConfig("ratio", 0.25, layer=2), 0.25),
                                            (PruningConfig("threshold", 0.99, min_keep=0.3), 0.3)])
def test_pruning_shortens_sequence_and_cache(prompt_case, pruning, share):
    decoder, prefix_ids, own, *_ = prompt_case
    n_image = prefix_ids.count(decoder.image_token_id)
    prompted = _prefill(prompt_case, pruning)
    assert prompted.kept_ratio == [pytest.approx(share)] * 3
    kept = round(share * n_image)
    cache = prompted.cache
    assert cache.length == len(prefix_ids) - n_image + kept + max(map(len, own))
    assert all(k.shape[2] == cache.length and v.shape[2] == cache.length for k, v in zip(cache.keys, cache.values))
    is_image = cache.block >= 0
    assert (is_image & cache.valid).sum(1).tolist() == [kept] * 3
    assert cache.valid.sum(1).tolist() == [len(prefix_ids) - n_image + kept + len(o) for o in own]
    assert not torch.allclose(prompted.next_logits[0], prompt_case[4][0], atol=1e-4)
    # Kept slots keep their original positions: still increasing, inside the prefix range.
    for row in range(3):
        positions = cache.pos[row][cache.valid[row]]
        assert (positions[1:] > positions[:-1]).all() and int(positions.max()) == len(prefix_ids) + len(own[row]) - 1
    with torch.no_grad():
        out = decode(decoder, prompted, rollouts=2, max_new_tokens=3, stop_ids=set(), temperature=1.0, seed=1)
    assert len(out.tokens) == 6 and all(len(t) == 3 for t in out.tokens)


SHARED = PruningConfig("ratio", 0.5, scope="shared")


@pytest.mark.parametrize("keep", [PruningConfig("ratio", 0.5), PruningConfig("top_p", 0.6, layer=2)])
@pytest.mark.parametrize("row", [0, 1, 2])
def test_shared_scope_with_one_prompt_is_the_prompt_scope(prompt_case, keep, row):
    per_prompt = _prefill(prompt_case, keep, [row])
    shared = _prefill(prompt_case, replace(keep, scope="shared"), [row])
    assert shared.kept_ratio == per_prompt.kept_ratio
    # The same computation in other matmul shapes: equal up to float rounding (~1e-7 here).
    torch.testing.assert_close(shared.next_logits, per_prompt.next_logits, atol=1e-6, rtol=0)
    assert shared.cache.length == per_prompt.cache.length
    for name in ("pos", "valid", "block"):
        assert torch.equal(getattr(shared.cache, name), getattr(per_prompt.cache, name)), name


def test_shared_scope_keeping_everything_gives_the_full_forward_logits(prompt_case):
    # Several rows of different lengths: the prompts' first layers' keys follow the kept prefix.
    prompted = _prefill(prompt_case, PruningConfig("ratio", 1.0, scope="shared"))
    assert prompted.kept_ratio == [1.0, 1.0, 1.0]
    for row, reference in enumerate(prompt_case[4]):
        torch.testing.assert_close(prompted.next_logits[row], reference, atol=1e-4, rtol=0)


def _layer_inputs(decoder, pruning: PruningConfig, case) -> tuple[list[tuple[int, int]], object]:
    """Shapes (rows, tokens) of every call of the pruning layer's decoder layer, and the result."""
    layer = decoder.lm.layers[pruning.layer_for(decoder.num_layers)]
    shapes = []
    hook = layer.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    try:
        prompted = _prefill(case, pruning)
    finally:
        hook.remove()
    return shapes, prompted


def test_shared_scope_keeps_one_set_and_runs_the_prefix_once(prompt_case):
    decoder, prefix_ids, own, *_ = prompt_case
    n_image, longest = prefix_ids.count(decoder.image_token_id), max(map(len, own))
    kept_prefix = len(prefix_ids) - n_image + n_image // 2
    shapes, prompted = _layer_inputs(decoder, SHARED, prompt_case)
    # The kept prefix runs the layers after the pruning layer once, then the prompts on it.
    assert shapes == [(1, kept_prefix), (3, longest)]
    per_prompt_shapes, _ = _layer_inputs(decoder, PruningConfig("ratio", 0.5), prompt_case)
    assert per_prompt_shapes == [(3, kept_prefix + longest)]  # once per prompt
    assert prompted.kept_ratio == [0.5] * 3
    cache = prompted.cache
    assert cache.length == kept_prefix + longest
    # The kept prefix is held once; each prompt's row holds only its own slots.
    assert cache.shared == prompted.shared_slots == kept_prefix
    assert all(k.shape[0] == 1 and k.shape[2] == kept_prefix for k in cache.shared_keys)
    assert all(k.shape[:3] == (3, k.shape[1], longest) for k in cache.keys)
    prefix_slots = slice(0, kept_prefix)
    for name in ("pos", "valid", "block"):  # one set: every row holds the same prefix slots
        t = getattr(cache, name)[:, prefix_slots]
        assert (t == t[:1]).all(), name
    assert ((cache.block >= 0) & cache.valid).sum(1).tolist() == [n_image // 2] * 3
    assert cache.valid.sum(1).tolist() == [kept_prefix + len(o) for o in own]
    again = _prefill(prompt_case, SHARED)
    assert torch.equal(again.next_logits, prompted.next_logits) and torch.equal(again.cache.pos, cache.pos)
    with torch.no_grad():
        out = decode(decoder, prompted, rollouts=2, max_new_tokens=3, stop_ids=set(), temperature=1.0, seed=1)
    assert len(out.tokens) == 6 and all(len(t) == 3 for t in out.tokens)


def test_a_shared_cache_reads_as_the_copies_it_replaces():
    g = torch.Generator().manual_seed(3)
    prefix_k, prefix_v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    own_k, own_v = torch.randn(3, 2, 2, 4, generator=g), torch.randn(3, 2, 2, 4, generator=g)
    cache = TokenCache(1)
    cache.add_slots(torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool), torch.full((1, 5), -1))
    cache.update(prefix_k, prefix_v, 0)
    cache.share_rows(3)
    cache.add_slots(torch.arange(5, 7).expand(3, -1), torch.ones(3, 2, dtype=torch.bool), torch.full((3, 2), -1))
    assert [t.shape[2] for t in cache.update(own_k, own_v, 0)] == [2, 2]  # the rows' own slots only
    copies_k = torch.cat([prefix_k.expand(3, -1, -1, -1), own_k], 2)
    copies_v = torch.cat([prefix_v.expand(3, -1, -1, -1), own_v], 2)
    index = torch.tensor([[0, 4, 5, 6], [6, 1, 1, 2], [3, 5, 0, 4]])
    k, v = cache.slots(0, index)
    assert torch.equal(k, copies_k.gather(2, index[:, None, :, None].expand(-1, 2, -1, 4)))
    assert torch.equal(v, copies_v.gather(2, index[:, None, :, None].expand(-1, 2, -1, 4)))
    assert torch.equal(cache.leading(0, 5, 1)[0], prefix_k) and torch.equal(cache.leading(0, 6, 3)[1], copies_v[:, :, :6])
    assert torch.equal(cache.trailing(0, 5)[0], own_k) and torch.equal(cache.trailing(0, 6)[1], own_v[:, :, 1:])
    with pytest.raises(ValueError, match="shared slots"):
        cache.trailing(0, 3)
    cache.gather_slots(index, torch.ones_like(index, dtype=torch.bool))
    assert cache.shared == 0 and torch.equal(cache.keys[0], k) and cache.pos.tolist() == index.tolist()
    with pytest.raises(ValueError, match="3 rows"):
        cache.share_rows(2)


def test_keep_rules():
    u = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # rho = 0, .25, .5, .75, 1
    assert keep_tokens(u, PruningConfig("threshold", 0.5, min_keep=0)).tolist() == [False, False, False, True, True]
    # top_p: rho mass 2.5; the two highest hold 1.75 = 70 %, the three highest 2.25 = 90 %
    assert keep_tokens(u, PruningConfig("top_p", 0.7, min_keep=0)).tolist() == [False, False, False, True, True]
    assert keep_tokens(u, PruningConfig("top_p", 0.71, min_keep=0)).tolist() == [False, False, True, True, True]
    assert keep_tokens(u, PruningConfig("ratio", 0.4, min_keep=0)).tolist() == [False, False, False, True, True]
    # the floor tops up with the most salient tokens
    assert keep_tokens(u, PruningConfig("threshold", 0.9, min_keep=0.6)).tolist() == [False, False, True, True, True]
    assert keep_tokens(u, PruningConfig("off")).all()
    assert normalized(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]


def test_saliency_follows_photons_formula():
    generator = torch.Generator().manual_seed(0)
    q, kq, ki = (torch.randn(2, n, 8, generator=generator) for n in (3, 3, 5))
    scale = 8 ** -0.5
    expected = torch.zeros(5)
    for h in range(2):
        c = torch.tensor([sum(max(float(q[h, t] @ kq[h, s]) * scale, 0.0) for s in range(3) if s != t) for t in range(3)])
        w = c / max(float(c.sum()), 1.0)
        for j in range(5):
            expected[j] += sum(w[t] * float(q[h, t] @ ki[h, j]) * scale for t in range(3)) / 2
    torch.testing.assert_close(saliency(q, kq, ki, scale), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"keep": "half"}, {"keep": "threshold", "keep_value": 1.0},
                                    {"keep": "top_p", "keep_value": 0.0}, {"keep": "ratio", "keep_value": 1.5},
                                    {"min_keep": 2.0}, {"layer": -1}, {"keep": "ratio", "scope": "bogus"}])
def test_pruning_config_validates(kwargs):
    with pytest.raises(ValueError, match="pruning"):
        PruningConfig(**kwargs)
    with pytest.raises(ValueError, match="does not exist"):
        PruningConfig("ratio", layer=9).layer_for(4)


# --- the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize("pruning", [PruningConfig(), PruningConfig("top_p", 0.6), SHARED])
def test_engine_reads_a_volume(tiny, pruning):
    model, processor = tiny
    engine = MedGemmaEngine(model, processor, max_new_tokens=6, max_slices=8, pruning=pruning)
    volume = _volume(_hu(slices=12, rows=48, cols=64, seed=3))
    request = ReadRequest(topics=("lungs", "heart"), questions=(QUESTIONS[0],), rollouts=2, temperature=1.0)
    result = engine.run(volume, request)
    assert [t.topic for t in result.topics] == ["lungs", "heart"]
    assert [a.question for a in result.answers] == [QUESTIONS[0]]
    assert result.engine.name == "medgemma" and result.series_instance_uid == volume.series_instance_uid
    again = StudyResult.from_dict(json.loads(json.dumps(result.to_dict())))
    again.check_fits(volume.shape)
    extra = result.extra
    assert set(extra["timings"]) >= {"encode_s", "prefill_s", "prompts_s", "decode_s"}
    assert extra["slice_indices"] == select_slice_indices(12, 8)
    assert extra["tokens"]["image"] == 8 * TOKENS_PER_IMAGE and extra["tokens"]["slices"] == 8
    assert set(extra["tokens"]["prompts"]) == {"lungs", "heart", QUESTIONS[0]}
    assert extra["pruning"]["scope"] == pruning.scope
    if pruning.active:
        assert 0 < extra["mean_kept_ratio"] <= 1 and all("kept_ratio" in t.extra for t in result.topics)
        if pruning.scope == "shared":  # one set for every prompt of the read
            assert {t.extra["kept_ratio"] for t in result.topics} == {0.5}
    else:
        assert extra["mean_kept_ratio"] is None and "kept_ratio" not in result.topics[0].extra
    assert engine.run(volume, request).to_dict()["topics"] == result.to_dict()["topics"]  # seeded


def test_the_engine_keeps_a_decoder_per_layout_from_read_to_read(tiny):
    model, processor = tiny

    def study(seed: int):
        return _volume(_hu(slices=12, rows=48, cols=64, seed=seed))

    engine = MedGemmaEngine(model, processor, max_new_tokens=6, max_slices=8)
    request = ReadRequest(topics=("lungs", "heart"), questions=(), rollouts=2, temperature=1.0, reground=False)
    engine.run(study(3), request)
    first = dict(engine.decoders.kept)
    second = engine.run(study(4), request)  # another study, the same layout: the same buffers, refilled
    assert dict(engine.decoders.kept) == first and len(first) == 1
    fresh = MedGemmaEngine(model, processor, max_new_tokens=6, max_slices=8).run(study(4), request)
    assert second.to_dict()["topics"] == fresh.to_dict()["topics"]
    engine.run(study(4), replace(request, topics=("lungs",)))  # a re-look's layout gets its own
    engine.run(study(5), request)
    assert len(engine.decoders.kept) == 2 and list(engine.decoders.kept.values())[-1] is list(first.values())[0]
    engine.run(study(5), replace(request, topics=("bones",), rollouts=3))  # a third evicts the least recent
    assert [layout[:2] for layout in engine.decoders.kept] == [(2, 2), (1, 3)]


def test_settings_choose_the_pruning_scope(tiny_folder, monkeypatch):
    from engines.registry import create_engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = create_engine("medgemma", model_path=tiny_folder,
                           pruning={"keep": "top_p", "keep_value": 0.5, "scope": "shared"})
    assert engine.pruning == PruningConfig("top_p", 0.5, scope="shared")


def test_consensus_findings_from_rollouts(engine):
    layout = SliceLayout(selected=(0, 5, 10, 15), image_shape=(40, 80), pad_offset=(20, 0), padded_size=80, n_slices=20)
    nodule = 'A 6 mm nodule in the right lung. ```json\n[{"box_2d": [250, 100, 500, 200], "label": "nodule", "slice": 2}]\n```'
    shifted = nodule.replace("[250, 100, 500, 200]", "[260, 100, 500, 210]")
    lungs = [Rollout(nodule, [0.5] * 60, list(range(2, 122, 2))), Rollout(shifted),
             Rollout(nodule.replace("[250, 100, 500, 200]", "[250, 110, 490, 200]")), Rollout("```json\n[{broken\n```"),
             Rollout('Mass. [{"box_2d": [0, 0, 200, 1000], "label": "mass", "slice": 1}]')]
    answers = [Rollout("No."), Rollout("no"), Rollout("Yes. [{\"box_2d\": [250, 100, 500, 200], \"slice\": 1}]"),
               Rollout("No"), Rollout("NO. ")]
    unreadable = [Rollout("```json\n[{broken\n```")] * 3 + [Rollout("The liver is normal.")] * 2
    sampled = Sampled(layout, {"lungs": lungs, "heart": [Rollout("The heart is normal.")] * 5, "liver": unreadable,
                               QUESTIONS[0]: answers}, None, {}, {})
    request = ReadRequest(topics=("lungs", "heart", "liver"), questions=(QUESTIONS[0],), rollouts=5)
    topics, replies = engine.assemble(sampled, request)
    lung, heart, liver = topics
    [finding] = lung.findings
    assert not lung.normal and finding.type == "nodule" and finding.text == "A 6 mm nodule in the right lung."
    assert finding.size_mm == 6.0 and finding.extra["agreement"] == 0.6 and 0 < finding.confidence <= 0.6
    assert finding.box.voxel[0] == 5 and finding.box.voxel[3] == 10  # SLICE 2 -> k 5..9
    # one member's box tokens had entropy 0.5, the two others are unknown (counted as 0)
    assert finding.extra["box_entropy"] == pytest.approx(0.5 / 3, abs=1e-4)
    assert "rollout 3: malformed JSON" in lung.extra["error"] and "rollout 4, box 0" in lung.extra["error"]
    assert heart.normal and heart.text == "The heart is normal." and not heart.findings
    # 3 of 5 answers unreadable: not claimed normal, no findings, the errors recorded
    assert not liver.normal and liver.text is None and not liver.findings and "rollout 2" in liver.extra["error"]
    [reply] = replies
    assert reply.answer == "no" and reply.confidence == 0.8 and reply.box is None


def test_rollout_span_entropy():
    rollout = Rollout("ab cd ef", [1.0, 2.0, 3.0], [2, 5, 8])
    assert rollout.span_entropy((3, 5)) == 2.0 and rollout.span_entropy((1, 4)) == 1.5
    assert Rollout("x").span_entropy((0, 1)) is None and rollout.span_entropy(None) is None
