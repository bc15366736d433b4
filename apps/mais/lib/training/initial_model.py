"""The model a training run starts from: the `init` weights file's network with this run's memory settings, or a
fresh network; in train mode, its encoder frozen when asked."""

from __future__ import annotations

import dataclasses
import logging

import torch

from lib.model.builder import build_mais
from lib.model.config import NETWORKS
from lib.model.mais import Mais
from lib.model.weights import load_mais
from lib.training.config import FitConfig

logger = logging.getLogger(__name__)


def build_model(config: FitConfig, device: torch.device) -> Mais:
    """The model to train, in train mode on `device`, its encoder frozen when asked: the `init` weights file's
    network with this run's memory settings, or a random `encoder` network when there is no `init`."""
    torch.manual_seed(config.seed)  # the random initialisation is part of the run's seed
    if config.init is None:
        network = NETWORKS[config.encoder](
            memory_mode=config.memory_mode, memory_size=config.memory_size, prompt_clicks=config.prompt_clicks
        )
        switches = {
            "refinement": config.refinement,
            "high_res_features": config.high_res_features,
            "high_res_prompts": config.high_res_prompts,
            "high_res_context": config.high_res_context,
        }
        network = dataclasses.replace(network, **{k: v for k, v in switches.items() if v is not None})
        model = build_mais(network)
    else:
        model = _model_from_init(config)
    model.to(device).train()
    set_encoder_frozen(model, config.freeze_encoder)
    return model


def _model_from_init(config: FitConfig) -> Mais:
    """The `init` file's network with this run's memory mode and size (and refinement head, high-resolution
    features, their prompts and context, when set), loaded with every weight whose shape still fits. Only
    memory-attention weights (its age embeddings are sized by memory_size, so a stage-1 file trained with N = 60
    also starts an N = 10 run) and a refinement head, high-resolution features, prompt branch or context the file
    lacks may start fresh; any other mismatch is an error. A file's head or features that this run drops are left
    out."""
    source = load_mais(config.init, device="cpu")
    refinement = source.config.refinement if config.refinement is None else config.refinement
    high_res = source.config.high_res_features if config.high_res_features is None else config.high_res_features
    # the file's prompt branch and context go with its features; one asked for without features is MaisConfig's
    # error
    prompts = config.high_res_prompts
    if prompts is None:
        prompts = source.config.high_res_prompts and high_res
    context = config.high_res_context
    if context is None:
        context = source.config.high_res_context and high_res
    model = build_mais(
        dataclasses.replace(
            source.config,
            memory_mode=config.memory_mode,
            memory_size=config.memory_size,
            prompt_clicks=config.prompt_clicks,
            refinement=refinement,
            high_res_features=high_res,
            high_res_prompts=prompts,
            high_res_context=context,
        )
    )
    expected = model.state_dict()
    source_state = {k: v for k, v in source.state_dict().items() if k in expected}
    fresh = [
        k
        for k, v in expected.items()
        if k not in source_state
        or source_state[k].shape != v.shape
        or (config.fresh_memory and k.startswith("memory_attention."))
    ]
    foreign = [k for k in fresh if not k.startswith(("memory_attention.", "refinement.", "high_res."))]
    if foreign:
        raise ValueError(f"--init {config.init}: weight {foreign[0]!r} does not fit this network")
    model.load_state_dict({k: v for k, v in source_state.items() if k not in fresh}, strict=False)
    logger.info("initialised %s from %s; fresh: %s", source.config.name, config.init, ", ".join(fresh) or "nothing")
    return model


def set_encoder_frozen(model: Mais, frozen: bool) -> None:
    """Freeze (no gradients, eval mode) or unfreeze the image encoder; the rest of the model is left as it is."""
    model.image_encoder.requires_grad_(not frozen)
    model.image_encoder.train(not frozen and model.training)
