"""Training core (lib.training): synthetic volumes, the interaction loop, and `fit` end to end. CPU only, no server.

Everything runs on a tiny network (64^3 crops, a one-block encoder) so that many steps take seconds; the real
light model goes through the same code (checked by hand with the CLI).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lib.model.builder import build_mais
from lib.model.config import EncoderConfig, MaisConfig
from lib.model.weights import load_mais, save_mais
from lib.training.checkpoint import RandomStreams, load_checkpoint, save_checkpoint
from lib.training.config import FitConfig
from lib.training.data_sources import load_training_pairs, save_training_pair
from lib.training.distributed import fit_distributed
from lib.training.fit import build_parser, parse_args
from lib.training.initial_model import set_encoder_frozen
from lib.training.interaction_loop import InteractionConfig, click_loss, run_interaction
from lib.training.loop import fit
from lib.training.optimisation import make_optimiser
from lib.training.real_data import StructureCrop
from lib.training.synthetic import SyntheticConfig, synthetic_sample, synthetic_stream
from lib.training.validation import validate

TINY_SIZE = 64
TINY_SYNTHETIC = SyntheticConfig(size=TINY_SIZE, radius_range=(3.0, 14.0))


def tiny_model(memory_mode: str = "both", prompt_clicks: str = "all", high_res_features: bool = False):
    torch.manual_seed(0)
    encoder = EncoderConfig(embed_dim=32, depth=1, num_heads=2, window_size=0, img_size=TINY_SIZE)
    config = MaisConfig(
        name="tiny",
        encoder=encoder,
        memory_mode=memory_mode,
        memory_size=8,
        prompt_clicks=prompt_clicks,
        high_res_features=high_res_features,
    )
    return build_mais(config).train()


def tiny_batch(batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """images float32 [B, 1, S, S, S] and masks bool [B, 1, S, S, S] of `batch_size` synthetic samples."""
    generator = torch.Generator().manual_seed(seed)
    samples = [synthetic_sample(generator, TINY_SYNTHETIC) for _ in range(batch_size)]
    return torch.stack([image for image, _ in samples]), torch.stack([mask for _, mask in samples])


def parameters_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_volumes_are_normalised_non_empty_and_seeded():
    images, masks = tiny_batch(3)
    assert images.shape == (3, 1, TINY_SIZE, TINY_SIZE, TINY_SIZE) and images.dtype == torch.float32
    assert masks.shape == images.shape and masks.dtype == torch.bool
    assert all(m.sum() >= TINY_SYNTHETIC.min_target_voxels for m in masks)
    assert torch.isfinite(images).all() and images.std() > 0.5  # z-normalised, not a constant
    again_images, again_masks = tiny_batch(3)
    assert torch.equal(images, again_images) and torch.equal(masks, again_masks)
    other_images, _ = tiny_batch(3, seed=1)
    assert not torch.equal(images, other_images)


def test_a_synthetic_target_too_small_is_replaced_by_a_sphere_large_enough():
    # shapes of radius 3-4 voxels hold a few hundred voxels, so each of these targets is the sphere that stands in
    # (no body outline, which may cut a target after its size is settled)
    config = dataclasses.replace(TINY_SYNTHETIC, radius_range=(3.0, 4.0), tube_radius_range=(1.0, 1.5),
                                 min_target_voxels=5000, body_probability=0.0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for seed in range(4):
        _, mask = synthetic_sample(generator, config, host=torch.Generator().manual_seed(seed))
        assert config.min_target_voxels <= mask.sum() <= 4 * config.min_target_voxels
    # the host generator fixes the scalars, the caller's generator the noise: the same pair, the same sample
    a, b = (synthetic_sample(torch.Generator().manual_seed(3), TINY_SYNTHETIC, torch.Generator().manual_seed(4))
            for _ in range(2))  # fmt: skip
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_synthetic_stream_makes_valid_samples_in_worker_processes_in_a_seeded_order():
    def first(seed: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = synthetic_stream(seed, workers=2, config=TINY_SYNTHETIC)
        return [next(stream) for _ in range(count)]

    samples = first(seed=0)
    for image, mask in samples:
        assert image.shape == (1, TINY_SIZE, TINY_SIZE, TINY_SIZE) and mask.shape == image.shape
        assert mask.dtype == torch.bool and mask.sum() >= TINY_SYNTHETIC.min_target_voxels
        assert torch.isfinite(image).all() and image.std() > 0.5
    assert not torch.equal(samples[0][0], samples[1][0])  # the two workers draw different volumes
    assert all(torch.equal(a[0], b[0]) for a, b in zip(samples, first(seed=0)))
    assert not torch.equal(samples[0][0], first(seed=1, count=1)[0][0])


# ------------------------------------------------------------------------------------------ interaction loop


@pytest.mark.parametrize(("prompt_clicks", "points_per_step"), [("all", [1, 2, 3, 4]), ("latest", [1, 1, 1, 1])])
def test_interaction_loop_runs_steps_in_the_inference_order(prompt_clicks, points_per_step):
    """Step k predicts with the k clicks so far (or only click k, as SAM-Med3D trains), the memory of the k-1
    earlier steps and the previous logits."""
    model = tiny_model(prompt_clicks=prompt_clicks)
    images, masks = tiny_batch()
    seen = []
    predict = model.predict

    def spy(image_embeddings, point_coords, point_labels, prev_low_res_logits, memory, high_res):
        seen.append((point_coords.shape[1], len(memory), prev_low_res_logits is None))
        return predict(image_embeddings, point_coords, point_labels, prev_low_res_logits, memory, high_res)

    model.predict = spy
    result = run_interaction(
        model, model.embed_image(images), images, masks, np.random.default_rng(0), InteractionConfig(num_clicks=4)
    )
    assert seen == [(points, k, k == 0) for k, points in enumerate(points_per_step)]
    assert result.loss.ndim == 0 and result.loss.requires_grad
    assert result.dice_per_click.shape == (4,) and not result.dice_per_click.requires_grad
    assert result.final_masks.shape == masks.shape and result.final_masks.dtype == torch.bool


def test_training_steps_reduce_the_loss_and_leave_a_frozen_encoder_unchanged():
    model = tiny_model()
    set_encoder_frozen(model, True)
    optimiser, _ = make_optimiser(model, FitConfig(lr=1e-3, steps=10, warmup_steps=1))
    images, masks = tiny_batch()
    with torch.no_grad():
        image_embeddings = model.embed_image(images)
    config = InteractionConfig(num_clicks=3)
    encoder_before = parameters_of(model.image_encoder)
    rest_before = {
        part: parameters_of(getattr(model, part)) for part in ("prompt_encoder", "mask_decoder", "memory_attention")
    }

    def loss_on_the_batch() -> float:
        with torch.no_grad():
            return run_interaction(model, image_embeddings, images, masks, np.random.default_rng(0), config).loss.item()

    initial_loss = loss_on_the_batch()
    for step in range(10):
        result = run_interaction(model, image_embeddings, images, masks, np.random.default_rng(step), config)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
    assert loss_on_the_batch() < initial_loss - 0.05

    assert not changed(encoder_before, model.image_encoder)
    assert all(p.grad is None for p in model.image_encoder.parameters())
    for part, before in rest_before.items():
        assert changed(before, getattr(model, part)), f"{part} did not train"


def test_learning_rate_warms_up_then_decays_over_steps_or_time_budget_whichever_ends_first():
    model = tiny_model()
    optimiser, budgeted = make_optimiser(model, FitConfig(lr=1e-3, steps=1000, warmup_steps=10, time_budget_s=100))
    assert budgeted.apply(0, elapsed_s=0.0) == pytest.approx(1e-4)  # warm-up step 1 of 10
    assert budgeted.apply(20, elapsed_s=50.0) == pytest.approx(0.55e-3)  # half the budget: half-way down the cosine
    assert optimiser.param_groups[0]["lr"] == pytest.approx(0.55e-3)
    assert budgeted.apply(20, elapsed_s=100.0) == pytest.approx(1e-4)  # budget spent: the floor, 10% of the peak
    _, unbudgeted = make_optimiser(model, FitConfig(lr=1e-3, steps=1000, warmup_steps=10))
    assert unbudgeted.apply(20, elapsed_s=1e6) > 0.99e-3
    assert unbudgeted.apply(1000, elapsed_s=0.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("high_res_features", [False, True])
def test_the_parts_that_start_at_zero_learn_at_their_own_scale_of_the_learning_rate(high_res_features):
    model = tiny_model(high_res_features=high_res_features)
    config = FitConfig(lr=1e-3, steps=100, warmup_steps=1, memory_lr_scale=10, high_res_lr_scale=30)
    optimiser, schedule = make_optimiser(model, config)
    assert schedule.apply(0, elapsed_s=0.0) == pytest.approx(1e-3)
    rates = {id(p): group["lr"] for group in optimiser.param_groups for p in group["params"]}
    memory = {id(p) for p in model.memory_attention.parameters()}
    high_res = {id(p) for p in model.high_res.parameters()} if high_res_features else set()
    assert memory and all(rates[i] == pytest.approx(1e-2) for i in memory)
    assert bool(high_res) == high_res_features and all(rates[i] == pytest.approx(3e-2) for i in high_res)
    assert all(rate == pytest.approx(1e-3) for i, rate in rates.items() if i not in memory | high_res)
    assert len(rates) == sum(p.requires_grad for p in model.parameters())  # every trainable weight, once


def test_a_run_resumed_with_other_learning_rate_scales_takes_its_own(tmp_path):
    model = tiny_model(high_res_features=True)
    saved = FitConfig(out=tmp_path / "run.pt", lr=1e-3, steps=100, memory_lr_scale=10, high_res_lr_scale=30)
    optimiser, _ = make_optimiser(model, saved)
    save_checkpoint(
        model, optimiser, RandomStreams.capture(np.random.default_rng(0), torch.Generator()), 5, saved, None
    )
    # a state written before a config field existed still resumes (the field reads as its default)
    state = torch.load(saved.state_path, weights_only=True)
    del state["mais_config"]["high_res_prompts"]
    torch.save(state, saved.state_path)
    resumed, schedule = make_optimiser(model, FitConfig(lr=1e-3, steps=100, memory_lr_scale=1, high_res_lr_scale=3))
    step = load_checkpoint(saved.state_path, model, resumed, np.random.default_rng(1), torch.Generator())
    peak = schedule.apply(step, elapsed_s=0.0)
    scale = {id(p): round(group["lr"] / peak, 6) for group in resumed.param_groups for p in group["params"]}
    assert step == 5
    assert {scale[id(p)] for p in model.high_res.parameters()} == {3}
    assert {scale[id(p)] for p in model.memory_attention.parameters()} == {1}


def test_a_trainable_encoder_gets_gradients_through_the_loop():
    model = tiny_model("none")
    images, masks = tiny_batch(1)
    result = run_interaction(
        model, model.embed_image(images), images, masks, np.random.default_rng(0), InteractionConfig(num_clicks=2)
    )
    result.loss.backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny random network saved as MAIS weights: `fit --init` trains it at 64^3 in a fraction of a second."""
    return save_mais(tiny_model(), tmp_path_factory.mktemp("init") / "tiny.pt")


def fit_config(tmp_path, tiny_weights, name: str, **overrides) -> FitConfig:
    settings = dict(
        out=tmp_path / f"{name}.pt",
        init=tiny_weights,
        memory_size=8,
        steps=3,
        batch_size=2,
        clicks=2,
        lr=1e-3,
        warmup_steps=1,
        seed=3,
    )
    settings.update(overrides)
    return FitConfig(**settings)


def test_fit_with_a_frozen_encoder_trains_the_rest_and_saves_loadable_weights(tmp_path, tiny_weights):
    config = fit_config(tmp_path, tiny_weights, "frozen", synthetic_pool=2)  # a small pool: steps hit the cache
    logs = []
    result = fit(config, on_log=logs.append)
    assert result.finished and result.steps_done == 3 and logs and logs[-1].step == 3
    assert set(logs[-1].dice_at_click) == {1}  # clicks 5 and 10 are beyond K = 2
    initial, trained = load_mais(tiny_weights), load_mais(result.weights_path)
    assert trained.config.memory_size == 8
    assert not changed(parameters_of(initial.image_encoder), trained.image_encoder)
    assert changed(parameters_of(initial.mask_decoder), trained.mask_decoder)


def test_fit_with_a_trainable_encoder_changes_the_encoder(tmp_path, tiny_weights):
    config = fit_config(tmp_path, tiny_weights, "full", steps=1, freeze_encoder=False, memory_mode="none")
    initial, trained = load_mais(tiny_weights), load_mais(fit(config).weights_path)
    assert changed(parameters_of(initial.image_encoder), trained.image_encoder)


def test_fit_init_may_change_the_memory_size_and_prompt_clicks(tmp_path, tiny_weights):
    config = fit_config(tmp_path, tiny_weights, "n4", steps=1, memory_size=4, prompt_clicks="latest")
    trained = load_mais(fit(config).weights_path)
    assert trained.config.memory_size == 4 and trained.config.prompt_clicks == "latest"
    # the encoder came from the init file (a fresh seed-3 network would differ) and stayed frozen
    assert not changed(parameters_of(load_mais(tiny_weights).image_encoder), trained.image_encoder)


def test_fit_resumes_exactly_where_the_time_budget_stopped_it(tmp_path, tiny_weights):
    straight = fit(fit_config(tmp_path, tiny_weights, "straight"))
    first = fit(fit_config(tmp_path, tiny_weights, "split", time_budget_s=1e-6))  # stops after its first step
    assert not first.finished and first.steps_done == 1
    resumed = fit(fit_config(tmp_path, tiny_weights, "split", resume=first.state_path))
    assert resumed.finished and resumed.steps_done == 3
    expected, got = load_mais(straight.weights_path).state_dict(), load_mais(resumed.weights_path).state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_fit_reads_a_data_dir_of_training_pairs(tmp_path, tiny_weights):
    images, masks = tiny_batch(1)
    label = masks[0].to(torch.uint8)
    label[0, :4] = 2  # a second structure: each label value is its own target
    data_dir = tmp_path / "pairs"
    data_dir.mkdir()
    save_training_pair(data_dir / "case.pt", images[0], label)
    assert len(load_training_pairs(data_dir, TINY_SIZE)) == 2
    result = fit(fit_config(tmp_path, tiny_weights, "real", steps=1, data_dir=data_dir, synthetic_fraction=0.0))
    assert result.finished


def test_cli_parses_the_documented_options(tmp_path):
    options = "--encoder light --memory-mode dense --steps 7 --batch-size 3 --lr 2e-4 --clicks 5 --train-encoder "
    options += "--synthetic-fraction 0.5 --seed 9 --time-budget-s 60 --amp bf16"
    config, gpus = parse_args([*options.split(), "--data-dir", str(tmp_path), "--out", str(tmp_path / "w.pt")])
    assert (config.memory_mode, config.steps, config.batch_size, config.clicks) == ("dense", 7, 3, 5)
    assert not config.freeze_encoder and config.synthetic_fraction == 0.5 and config.amp == "bf16"
    assert gpus == 1 and parse_args(["--gpus", "2"])[1] == 2
    assert parse_args([])[0].freeze_encoder  # frozen by default: the web-UI trainer's CPU fine-tune
    with pytest.raises(SystemExit):
        parse_args(["--memory-mode", "everything"])


def test_every_fit_config_field_is_a_command_line_option():
    options = {flag for action in build_parser()._actions for flag in action.option_strings}
    missing = [name for name in FitConfig.model_fields if "--" + name.replace("_", "-") not in options]
    assert not missing, f"FitConfig fields without an option: {missing}"
    config, _ = parse_args(
        "--max-grad-norm 0.5 --validate-every 3 --no-cache-embeddings --no-deterministic --fresh-memory".split()
    )
    assert (config.max_grad_norm, config.validate_every) == (0.5, 3)
    assert not config.cache_embeddings and not config.deterministic and config.fresh_memory
    assert parse_args([])[0] == FitConfig()  # options left out keep FitConfig's defaults


def test_the_command_line_refuses_what_fit_config_refuses_naming_the_option(capsys):
    for argv, option in ((["--synthetic-fraction", "1.5"], "--synthetic-fraction"), (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert option in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--freeze-encoder", "--train-encoder"])


# ------------------------------------------------------------------------------------- validation and DDP


def tiny_crops(count: int, seed: int) -> list[StructureCrop]:
    images, masks = tiny_batch(count, seed=seed)
    return [StructureCrop(image, mask, f"synthetic:{i}") for i, (image, mask) in enumerate(zip(images, masks))]


def test_fit_validates_before_during_and_after_and_keeps_the_best_weights(tmp_path, tiny_weights):
    crops = tiny_crops(2, seed=5)
    config = fit_config(tmp_path, tiny_weights, "val", steps=12, validate_every=4, synthetic_fraction=0.0, lr=3e-3)
    validations = []
    result = fit(config, crops=crops, val_crops=crops, on_validation=validations.append)
    assert [v.step for v in validations] == [0, 4, 8, 12]
    assert result.baseline.step == 0 and len(result.baseline.dice_per_click) == config.clicks
    assert set(result.baseline.per_target) == {"synthetic:0", "synthetic:1"}
    # trained on the very crops it is validated on: the score must rise, and the best weights are on disk
    assert result.best_step > 0 and result.best.score > result.baseline.score
    best = load_mais(config.best_path)
    again = validate(best.train(), crops, config.clicks, step=result.best_step, seed=config.seed)
    assert again.score == pytest.approx(result.best.score, abs=1e-6)


def test_fit_keeping_the_latest_weights_keeps_the_last_validation_that_beats_the_start(tmp_path, tiny_weights):
    """What the web-UI trainer asks for when it validates on its training images (lib/trainers/mais.py)."""
    crops = tiny_crops(2, seed=5)
    # at this learning rate the score peaks at step 2 and falls back, still above the start, by step 12
    config = fit_config(tmp_path, tiny_weights, "val", steps=12, validate_every=2, synthetic_fraction=0.0, lr=5e-3)
    validations = []
    result = fit(config.replace(keep_weights="latest"), crops=crops, val_crops=crops, on_validation=validations.append)
    start, later = validations[0], validations[1:]
    beating = [v for v in later if v.score > start.score]
    assert beating and result.best_step == beating[-1].step and result.best.score == beating[-1].score
    # the setting matters on this run: the best score came earlier than the latest that beats the start
    assert max(later, key=lambda v: v.score).step != result.best_step
    kept = validate(load_mais(config.best_path).train(), crops, config.clicks, step=result.best_step, seed=config.seed)
    assert kept.score == pytest.approx(result.best.score, abs=1e-6)


def test_validation_is_deterministic_and_restores_train_mode(tiny_weights):
    model = load_mais(tiny_weights).train()
    set_encoder_frozen(model, True)
    crops = tiny_crops(2, seed=6)
    first, second = (validate(model, crops, num_clicks=3, step=0) for _ in range(2))
    assert first.dice_per_click == second.dice_per_click and len(first.dice_per_click) == 3
    assert model.training and model.mask_decoder.training and not model.image_encoder.training


def test_fit_distributed_trains_with_ddp_on_two_cpu_processes(tmp_path, tiny_weights):
    """The multi-GPU path (one process per GPU, DDP) run on the CPU over gloo: same code, no GPU needed; with
    synthetic volumes from worker processes, as on the GPUs."""
    config = fit_config(tmp_path, tiny_weights, "ddp", steps=2, log_every=1, device="cpu", synthetic_workers=1)
    result = fit_distributed(config, world_size=2)
    assert result.finished and result.steps_done == 2
    assert result.last_log.step == 2
    initial, trained = load_mais(tiny_weights), load_mais(result.weights_path)
    assert changed(parameters_of(initial.mask_decoder), trained.mask_decoder)
    assert not changed(parameters_of(initial.image_encoder), trained.image_encoder)


def test_a_training_cache_without_a_share_of_the_samples_is_refused_not_ignored():
    for argv in (["--training-cache", "cache.npz"], ["--cache-fraction", "0.5"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    config, _ = parse_args(["--training-cache", "cache.npz", "--cache-fraction", "0.5"])
    assert config.cache_fraction == 0.5


def test_the_click_loss_is_the_cross_entropy_around_each_click_against_the_truth():
    truth = torch.zeros(1, 1, 16, 16, 16)
    truth[0, 0, 4:12, 4:12, 4:12] = 1.0
    coords = torch.tensor([[[8.0, 8.0, 8.0], [1.2, 1.4, 0.6], [15.0, 15.0, 15.0]]])
    labels = torch.tensor([[1, 0, -1]])  # the third is padding
    obeyed = torch.where(truth > 0, 6.0, -6.0)
    # the positive click's 3^3 voxels turned background: only that click's voxels are wrong
    disobeyed = obeyed.clone()
    disobeyed[0, 0, 7:10, 7:10, 7:10] = -6.0
    # a wrong voxel near the padding point alone changes nothing
    padding_wrong = obeyed.clone()
    padding_wrong[0, 0, 14:, 14:, 14:] = 6.0
    low, high = click_loss(obeyed, truth, coords, labels), click_loss(disobeyed, truth, coords, labels)
    assert high > 2.9 > 0.01 > low  # half the 54 voxels wrong by 6 logits: a mean BCE of about 3
    assert click_loss(padding_wrong, truth, coords, labels) == low
    # no clicks at all (every row padding): no loss, and no NaN
    assert click_loss(disobeyed, truth, coords, torch.full_like(labels, -1)) == 0


def test_the_click_weight_adds_the_click_loss_to_the_steps():
    model = tiny_model()
    images, masks = tiny_batch()
    with torch.no_grad():
        embeddings = model.embed_image(images)
        losses = [
            run_interaction(
                model, embeddings, images, masks, np.random.default_rng(0), InteractionConfig(num_clicks=2, **extra)
            ).loss
            for extra in ({}, {"click_weight": 1.0})
        ]
    assert losses[1] > losses[0] + 1e-4  # same clicks (same seed), the click loss on top
