"""Train a MAIS model with the interaction loop: the command line of `lib.training`.

    cd apps/mais && python -m lib.training.fit --help

Every option is a field of `FitConfig` (lib.training.config), generated from it, plus `--gpus`. The package, one
module a concept: config (FitConfig), data_sources (batches of real and synthetic samples, training-pair files,
the embedding cache), initial_model (init weights or a fresh network), optimisation (AdamW and its schedule),
checkpoint (weights and `--resume` state), progress (log lines, validation and the best weights), loop (`fit`),
distributed (`fit_distributed`, DDP over several GPUs); the interaction loop shared with validation is
interaction_loop, the synthetic volumes synthetic, the samples painted from label maps on the training device
synthesis, the crops of labelled images real_data.

Stages of the shipped weights: (1) the light encoder trains with the whole network on synthetic volumes
(`--train-encoder --memory-mode none`) and (2) the prompt encoder, mask decoder and memory attention fine-tune
on real crops plus synthetic volumes, encoder frozen (scripts/train_shipped_weights.sh); (3) the whole network
trains on samples painted from label maps, with mixed click rules (scripts/train_generalist.sh).
"""

from __future__ import annotations

import argparse
import logging
import types
from collections.abc import Sequence
from typing import Literal, Union, get_args, get_origin

import torch
from pydantic import ValidationError

from lib.training.config import FitConfig
from lib.training.distributed import fit_distributed
from lib.training.loop import FitResult, fit


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One option per FitConfig field (its description the help, its type the parsing), and `--gpus`. Options
    left out are left out of the config too, so FitConfig's defaults hold."""
    parser = argparse.ArgumentParser(prog="python -m lib.training.fit", description=__doc__.split("\n\n")[0])
    for name, field in FitConfig.model_fields.items():
        help_text = f"{field.description} (default: {field.default})".replace("%", "%%")
        kind = field.annotation
        if get_origin(kind) in (Union, types.UnionType):  # `X | None`: None is the default, not a value to type
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        if kind is bool:
            negative = (field.json_schema_extra or {}).get("negative_flag", "--no-" + _flag(name)[2:])
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(_flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            pair.add_argument(
                negative,
                dest=name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"the opposite of {_flag(name)}",
            )
        elif get_origin(kind) is Literal:
            choices = get_args(kind)
            parser.add_argument(
                _flag(name), type=type(choices[0]), choices=choices, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(_flag(name), type=kind, metavar=name.upper(), default=argparse.SUPPRESS, help=help_text)
    parser.add_argument(
        "--gpus", type=int, default=1, help="train on this many GPUs with DDP (--batch-size is per GPU) (default: 1)"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[FitConfig, int]:
    """(the run's FitConfig, the number of GPUs to train on). A value FitConfig refuses exits as argparse does,
    naming the option."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    gpus = args.pop("gpus")
    try:
        config = FitConfig(**args)
    except ValidationError as error:
        problems = [
            f"{_flag(str(item['loc'][0]))} {item['input']!r}: {item['msg']}" if item["loc"] else item["msg"]
            for item in error.errors()
        ]
        parser.error("; ".join(problems))
    return config, gpus


def main(argv: Sequence[str] | None = None) -> FitResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, gpus = parse_args(argv)
    result = fit_distributed(config, gpus) if gpus > 1 else fit(config)
    status = "finished" if result.finished else "stopped by the time budget"
    dice = result.last_log.dice_at_click if result.last_log else {}
    # one GPU trains in this process; several train in their own processes, whose peaks this one cannot see
    peak = ""
    if torch.cuda.is_initialized():
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(
        f"{status} at step {result.steps_done}/{config.steps}: {result.samples_per_s:.2f} samples/s{peak}, "
        f"train Dice {dice}; weights {result.weights_path}, state {result.state_path}"
    )
    return result


if __name__ == "__main__":
    main()
