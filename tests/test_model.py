"""The demo model's mechanics on a tiny random model: Photon scheduling, surrogate gradients,
independent topics, decoding grammar."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engines import training
from engines.decoding import generate
from engines.model import LESION_TYPES, ModelConfig, ReadoutVLM
from engines.preprocess import CHANNELS, GRID
from engines.tokenizer import Tokenizer

TINY = dict(dim=64, heads=4, encoder_layers=1, decoder_layers=4, schedule_layer=1)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture()
def model(tokenizer) -> ReadoutVLM:
    torch.manual_seed(1)  # a draw whose prompt tokens attend to each other, so saliency is not flat
    m = ReadoutVLM(ModelConfig(vocab_size=len(tokenizer), **TINY)).eval()
    # A threshold near the middle of rho's range, so the scheduler drops a real share of tokens.
    torch.nn.init.constant_(m.scheduler.threshold.out.bias, 0.0)
    return m


def _inputs(tokenizer, n_volumes=2, topics=("lungs", "heart")):
    torch.manual_seed(1)
    image = torch.rand(n_volumes, CHANNELS, *GRID)
    spacing = torch.tensor([[5.0, 2.0, 2.0], [2.5, 1.2, 1.2]][:n_volumes])
    prompts = [tokenizer.topic_prompt(t) for t in topics]
    longest = max(map(len, prompts))
    prompt = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    region = torch.rand(len(topics), 512)
    return image, spacing, prompt, region


def test_scheduler_shortens_sequence_and_cache_by_a_variable_amount(model, tokenizer):
    image, spacing, prompt, region = _inputs(tokenizer)
    with torch.no_grad():
        visual = model.encode(image, spacing)  # two different volumes, two different prompts
        full = model.prefill(visual, region, prompt, "off", physical=True)
        pruned = model.prefill(visual, region, prompt, "hard", physical=True)
    kept = pruned.kept.tolist()
    assert all(0 < k < 512 for k in kept) and kept[0] != kept[1]
    # Every layer's cache lost the dropped tokens (padded to the longest kept count).
    assert {c.length for c in full.caches} == {1 + 512 + prompt.shape[1]}
    assert {c.length for c in pruned.caches} == {1 + max(kept) + prompt.shape[1]}
    assert int(pruned.key_valid.sum(-1)[0]) == 1 + kept[0] + int((prompt[0] != 0).sum())


def test_prompts_share_one_visual_stream_per_volume(model, tokenizer):
    """Prompts reading the same volume through ``rows`` get what they would from their own copy."""
    image, spacing, prompt, region = _inputs(tokenizer, n_volumes=1)
    with torch.no_grad():
        visual = model.encode(image, spacing)
        shared = model.prefill(visual, region, prompt, "hard", physical=True, rows=torch.zeros(2, dtype=torch.long))
        copied = model.prefill(visual.take(torch.zeros(2, dtype=torch.long)), region, prompt, "hard", physical=True)
    assert torch.allclose(shared.logits, copied.logits, atol=1e-5)
    assert torch.equal(shared.kept, copied.kept)


def test_physical_pruning_equals_masking(model, tokenizer):
    image, spacing, prompt, region = _inputs(tokenizer)
    answer = torch.randint(10, 200, (2, 5))
    with torch.no_grad():
        visual = model.encode(image, spacing)
        masked = model.prefill(visual, region, prompt, "hard", capacity=5, physical=False)
        physical = model.prefill(visual, region, prompt, "hard", capacity=5, physical=True)
        a, b = model.extend(masked, answer), model.extend(physical, answer)
    assert physical.caches[0].length < masked.caches[0].length
    assert torch.allclose(a, b, atol=1e-4)


def test_surrogate_gradient_reaches_the_threshold_in_a_training_step(model, tokenizer):
    examples = [training.make_example(seed, tokenizer) for seed in (10_000_000, 10_000_001)]
    # Corrupt one volume and keep the other clean, so every loss term is present.
    batch = next(b for b in (training.collate(examples, torch.device("cpu"), 0.5, random.Random(s)) for s in range(50))
                 if b.corrupted.any() and not b.corrupted.all())
    model.train()
    losses = training._losses(model, tokenizer, batch, "hard", flip=True)
    assert {"ce", "band", "flip", "robust", "finding_map"} <= set(losses)
    sum(v for k, v in losses.items() if k not in ("accuracy", "kept")).backward()
    for param in model.scheduler.threshold.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
    assert model.scheduler.threshold.out.bias.grad.abs().item() > 0
    assert model.scheduler.threshold.out.weight.grad.abs().sum().item() > 0
    # The scheduling layer's projections learn through the saliency scores too.
    qkv = model.decoder[model.config.schedule_layer].attn.qkv.weight.grad
    assert torch.isfinite(qkv).all() and qkv.abs().sum() > 0
    assert model.finding_head.weight.grad.abs().sum() > 0 and model.stem[0].weight.grad.abs().sum() > 0
    assert all(head.weight.grad.abs().sum() > 0 for head in model.finding_heads)


def test_detect_phase_trains_only_the_encoder_and_its_finding_maps(model, tokenizer):
    batch = training.collate([training.make_example(10_000_000, tokenizer)], torch.device("cpu"))
    model.train()
    losses = training._losses(model, tokenizer, batch, "detect", flip=False)
    assert set(losses) == {"finding_map", "presence", "each_finding"}
    losses["finding_map"].backward()
    assert model.stem[0].weight.grad.abs().sum() > 0 and model.finding_head.weight.grad.abs().sum() > 0
    assert model.finding_refine[-1].weight.grad.abs().sum() > 0 and model.finding_fine[-1].weight.grad.abs().sum() > 0
    assert model.finding_lesions[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    # `vision()` names exactly what these losses train: the modules frozen once the decoder learns.
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    named = {name for name, p in model.named_parameters()}
    frozen = {id(p) for module in model.vision() for p in module.parameters()}
    assert trained == {name for name, p in model.named_parameters() if id(p) in frozen} and trained < named


def test_each_stage_warms_up_and_decays_its_own_learning_rate():
    d = training.DETECT_UNTIL
    assert training._phase(0.0) == "detect" and training._phase(d) == "off" and training._phase(0.999) == "hard"
    assert training._learning_rate(training._stage_progress(0.0, d)) == 0.0
    assert training._learning_rate(training._stage_progress(d, d)) == 0.0  # the decoder's stage starts afresh
    peak = training._learning_rate(training._stage_progress(d + training.WARMUP * (1 - d), d))
    assert peak == pytest.approx(training.LEARNING_RATE)
    assert training._learning_rate(training._stage_progress(d * 0.999, d)) < 1e-3 * peak


def test_cached_encoding_is_the_encoders_output_computed_once(model, tokenizer):
    examples = [training.make_example(seed, tokenizer) for seed in (10_000_000, 10_000_001)]
    fresh = training.collate(examples, torch.device("cpu"))
    batch = training.collate(examples, torch.device("cpu"), 1.0, random.Random(0), images=False)
    assert batch.image is None and batch.volume_corrupted.sum() == 2  # each example's first volume
    with torch.no_grad():
        expected = model.encode(fresh.image, fresh.spacing)
    cached = training.cached_encoding(model, examples, batch, random.Random(0))
    clean = ~batch.volume_corrupted
    assert cached.tokens.shape == expected.tokens.shape
    assert torch.allclose(cached.tokens[clean], expected.tokens[clean], atol=1e-5)
    assert not torch.allclose(cached.tokens[~clean], expected.tokens[~clean], atol=1e-3)
    kept = [ex.encoded for ex in examples]
    again = training.cached_encoding(model, examples, training.collate(examples, torch.device("cpu"), images=False),
                                     random.Random(1))
    assert all(ex.encoded is k for ex, k in zip(examples, kept))
    assert torch.allclose(again.finding_logits, expected.finding_logits, atol=1e-5)


def test_finding_maps_mark_each_findings_type_where_it_lies(tokenizer):
    from engines.phantom import TOPICS, render_phantom
    from engines.preprocess import FINDING_GRID, prepare
    from engines.prompts import MAP_TYPES

    phantom = render_phantom(7, findings={"lungs": ["mass"], "pleura": [], "heart": [], "liver": [], "bones": []})
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    maps = training.finding_maps(phantom, prepare(phantom.hu, spacing).extent)
    mass = MAP_TYPES.index("mass")
    assert maps.shape == (len(MAP_TYPES), *FINDING_GRID)
    assert maps[[i for i in range(len(MAP_TYPES)) if i != mass]].sum() == 0
    # The marked cells sit inside the mass's box, mapped onto the finding grid.
    box = phantom.truth.topics[TOPICS.index("lungs")].findings[0].box.voxel
    cells = np.argwhere(maps[mass])
    assert len(cells) > 0
    for axis in range(3):
        scale = FINDING_GRID[axis] / phantom.hu.shape[axis]
        assert cells[:, axis].min() >= int(box[axis] * scale) - 1
        assert cells[:, axis].max() <= int(box[axis + 3] * scale) + 1


def test_every_finding_marks_its_types_map_even_a_small_bone_lesion():
    from engines.phantom import TOPICS, render_phantom
    from engines.preprocess import prepare
    from engines.prompts import MAP_TYPES

    phantom = render_phantom(11, findings={"lungs": ["nodule"], "pleura": [], "heart": [], "liver": [],
                                           "bones": ["lytic lesion"]})
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    maps = training.finding_maps(phantom, prepare(phantom.hu, spacing).extent)
    lytic = maps[MAP_TYPES.index("lytic lesion")]
    assert (lytic > 0).sum() >= 1 and maps[MAP_TYPES.index("sclerotic lesion")].sum() == 0
    # Each finding's cells carry its own number.
    nodule = maps[MAP_TYPES.index("nodule")]
    assert (nodule > 0).sum() >= 1 and len(set(np.unique(nodule)) | set(np.unique(lytic))) == 3
    # Its cells cover the lesion's centre (the finding grid halves the 32x128x128 grid in-plane).
    box = phantom.truth.topics[TOPICS.index("bones")].findings[0].box.voxel
    cells = np.argwhere(lytic)
    centre = [(box[a] + box[a + 3]) / 2 / phantom.hu.shape[a] * lytic.shape[a] for a in range(3)]
    assert all(cells[:, a].min() - 1 <= centre[a] <= cells[:, a].max() + 2 for a in range(3))


def test_soft_dice_counts_only_maps_that_hold_a_finding():
    target = torch.zeros(2, 3, 4, 4, 4)
    target[0, 1, 1:3, 1:3, 1:3] = 1
    perfect = target * 40 - 20
    assert training.soft_dice_loss(perfect, target).item() < 1e-3
    assert training.soft_dice_loss(-perfect, target).item() > 0.99
    assert training.soft_dice_loss(perfect, torch.zeros_like(target)).item() == 0


def test_presence_loss_charges_a_map_that_fires_where_its_finding_is_absent():
    target = torch.zeros(2, 3, 4, 4, 4)
    target[0, 1, 1:3, 1:3, 1:3] = 1
    quiet = torch.full_like(target, -20.0)
    quiet[0, 1, 2, 2, 2] = 20.0  # one confident cell where the finding is: enough for presence
    assert training.presence_loss(quiet, target).item() < 1e-3
    firing = quiet.clone()
    firing[1, 2, 0, 0, 0] = 20.0  # a single firing cell in a volume without the finding
    assert training.presence_loss(firing, target).item() > 1.0


def test_lesion_read_out_moves_only_the_lung_lesion_maps(model, tokenizer):
    from engines.prompts import MAP_TYPES

    image, spacing, _, _ = _inputs(tokenizer, n_volumes=1)
    model.eval()
    with torch.no_grad():
        before = model.encode(image, spacing).finding_logits
        last = model.finding_lesions[-1]
        saved = last.bias.clone()
        last.bias.fill_(5.0)
        after = model.encode(image, spacing).finding_logits
        last.bias.copy_(saved)
    moved = sorted(MAP_TYPES[i] for i in range(len(MAP_TYPES)) if not torch.equal(before[:, i], after[:, i]))
    assert moved == sorted(LESION_TYPES)
    assert torch.allclose(after[:, model.config.lesion_maps], before[:, model.config.lesion_maps] + 5.0, atol=1e-4)


def test_input_read_outs_and_threshold_learn_at_their_own_rates(model):
    groups = training._parameter_groups(model)
    scale_of = {id(p): g["scale"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(scale_of) == len(names) == sum(len(g["params"]) for g in groups)  # each parameter once
    for name, parameter in names.items():
        expected = (training.THRESHOLD_LR_SCALE if name.startswith("scheduler.")
                    else training.READ_OUT_LR_SCALE if name.startswith(("finding_fine.", "finding_lesions."))
                    else 1.0)
        assert scale_of[id(parameter)] == expected, name
    assert training.READ_OUT_LR_SCALE > 1


def test_each_finding_loss_wants_every_finding_seen_not_just_the_strongest():
    numbers = torch.zeros(1, 2, 4, 4, 4, dtype=torch.uint8)
    numbers[0, 0, 0, 0, 0] = 1  # a small finding ...
    numbers[0, 0, 2:4, 2:4, 2:4] = 2  # ... and a large one of the same type
    logits = torch.full(numbers.shape, -20.0, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 3, 3, 3] = 20.0  # only the large one seen: the per-type presence term is content
    assert training.presence_loss(logits, (numbers > 0).float()).item() < 1e-3
    loss = training.each_finding_loss(logits, numbers)
    assert loss.item() > 9.0  # half of softplus(20): the small finding is missed
    loss.backward()
    assert logits.grad[0, 0, 0, 0, 0] < 0 and logits.grad[0, 1].abs().sum() == 0
    seen = logits.detach().clone()
    seen[0, 0, 0, 0, 0] = 20.0
    assert training.each_finding_loss(seen, numbers).item() < 1e-3
    assert training.each_finding_loss(seen, torch.zeros_like(numbers)).item() == 0


def test_topics_are_generated_independently(model, tokenizer):
    """Changing one topic's prompt in the batch leaves another topic's outputs unchanged."""
    image, spacing, _, _ = _inputs(tokenizer, n_volumes=1)
    answer = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(4))
    logits, tokens = [], []
    for other in ("heart", "bones"):
        _, _, prompt, _ = _inputs(tokenizer, 1, ("lungs", other))
        region = torch.rand(2, 512, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            visual = model.encode(image, spacing)  # one volume shared by both topics
            rows = torch.zeros(2, dtype=torch.long)
            logits.append(model.extend(model.prefill(visual, region, prompt, "hard", capacity=12, physical=True, rows=rows),
                                       answer))
            prefix = model.prefill(visual, region, prompt, "hard", capacity=24, physical=True, rows=rows)
            tokens.append(generate(model, prefix, tokenizer, max_new=24).tokens)
    assert torch.allclose(logits[0][0], logits[1][0], atol=1e-5)
    assert not torch.allclose(logits[0][1], logits[1][1], atol=1e-3)
    assert torch.equal(tokens[0][0], tokens[1][0])


def test_decoding_grammar_gives_wellformed_boxes(model, tokenizer):
    image, spacing, prompt, region = _inputs(tokenizer)
    with torch.no_grad():
        visual = model.encode(image, spacing)
        prefix = model.prefill(visual, region, prompt, "hard", capacity=60, physical=True)
        prefix.select(torch.arange(2).repeat_interleave(8))
        out = generate(model, prefix, tokenizer, max_new=60, temperature=1.5, generator=torch.Generator().manual_seed(0))
    for row in range(out.tokens.shape[0]):
        ids = out.tokens[row].tolist()
        for i, token in enumerate(ids):
            if token == tokenizer.box and i + 6 < len(ids):
                bins = [t - tokenizer.first_bin for t in ids[i + 1 : i + 7]]
                assert all(0 <= b < tokenizer.bins for b in bins)
                assert bins[3] >= bins[0] and bins[4] >= bins[1] and bins[5] >= bins[2]
        coordinates = [t for t in ids if tokenizer.is_bin(t)]
        assert len(coordinates) == int(out.is_coordinate[row].sum())


def test_kept_ratio_is_the_hard_share_with_the_gradient_of_mean_p():
    from engines.scheduler import kept_ratio, retention_band_loss

    p = torch.tensor([[0.51, 0.52, 0.6, 0.9], [0.1, 0.2, 0.55, 0.3]], requires_grad=True)
    ratio = kept_ratio(p, (p > 0.5).sum(-1))
    assert ratio.tolist() == pytest.approx([1.0, 0.25])
    # Mean p of the first row is 0.63, inside the band; the hard share of 1.0 is not.
    loss = retention_band_loss(ratio)
    assert loss.item() == pytest.approx((0.2 + 0.05) / 2)
    loss.backward()
    assert torch.allclose(p.grad, torch.tensor([[0.125] * 4, [-0.125] * 4]))



def test_one_outlying_saliency_does_not_squash_every_other_token():
    from engines.scheduler import min_max

    u = torch.cat([torch.linspace(-7.0, -6.0, 199), torch.tensor([8.0])])[None]
    plain, robust = min_max(u), min_max(u, 0.99)
    assert torch.equal(plain, (u - u.min()) / (u.max() - u.min()))
    assert plain[0, :-1].max() < 0.07  # the other 199 tokens crowd near 0 under the plain maximum
    assert robust[0, -1] == 1.0 and robust[0, :-1].max() == 1.0  # the top percent reaches 1
    assert robust[0, 99].item() == pytest.approx(0.5, abs=0.01)  # the rest spread over [0, 1]

@pytest.mark.slow
def test_training_can_start_from_saved_weights(tmp_path, monkeypatch):
    from engines.checkpoint import load_checkpoint

    monkeypatch.setattr(training, "VALIDATION_SEEDS", range(8000, 8001))
    monkeypatch.setattr(training, "VOLUMES_PER_STEP", 2)
    monkeypatch.setattr(training, "MAP_VOLUMES_PER_STEP", 2)
    quiet = dict(steps=1, workers=1, log=lambda _: None)
    earlier = training.train(tmp_path / "first", model_size=TINY, **quiet)
    assert earlier["training"]["steps"] == 1
    first, _ = load_checkpoint(tmp_path / "first" / "demo")
    info = training.train(tmp_path / "second", init=tmp_path / "first" / "demo", **quiet)
    second, _ = load_checkpoint(tmp_path / "second" / "demo")
    assert second.config == first.config
    assert info["training"]["started_from"]["steps"] == earlier["training"]["steps"]
    assert "| started from |" in (tmp_path / "second" / "MODEL_CARD.md").read_text()
    # It trained on from the first run's weights, not from fresh ones.
    fresh = ReadoutVLM(first.config)
    drift = lambda a, b: (a.token_embed.weight - b.token_embed.weight).abs().mean()  # noqa: E731
    assert drift(second, first) < drift(second, fresh) / 5
    # With no detect stage of its own, the second run trained the decoder alone: the encoder stayed as it was.
    assert all(torch.equal(a, b) for a, b in zip(second.stem.parameters(), first.stem.parameters()))
