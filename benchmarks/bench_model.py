"""Benchmark of the MAIS model core: parameters, encoder time, time of one click, session memory.

    .venv/bin/python benchmarks/bench_model.py                      # CPU
    python3 benchmarks/bench_model.py --device cuda --json out.json # one GPU

Prints markdown tables: parameters per part; encoder time of medim's forward against the fast exact path (both
configs, fp32, with the max abs difference between the two on random weights); one click = prompt encoder +
memory attention + mask decoder + upsampling to 128^3, for N = 0, 10, 60 memory slots and each memory mode; bytes
of one session's memory bank at N = 60. Random weights throughout (timings do not depend on them); times are
medians of --repeats runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from functools import partial
from pathlib import Path

import torch
from common import timed

from lib.model.builder import build_mais
from lib.model.config import MEMORY_MODES, MaisConfig
from lib.model.mais import Mais

logger = logging.getLogger("bench_model")
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "memory_attention")


def randomise(model: Mais) -> Mais:
    """Non-zero relative positions, position embedding, biases and memory output (zero-initialised in the build),
    so that the fast-vs-medim difference and the memory path are exercised for real."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or name.endswith("bias") or "memory_attention.out_proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "rel_pos" in name else 0.05))
    return model


def bench_encoder(config: MaisConfig, device: torch.device, repeats: int, reference_repeats: int) -> dict:
    model = randomise(build_mais(config)).to(device)
    volume = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1)).to(device)
    enc = model.image_encoder
    with torch.inference_mode():
        row = {
            "config": config.name,
            "max_abs_diff": (enc(volume) - enc.forward_reference(volume)).abs().max().item(),
            "medim_ms": timed(partial(enc.forward_reference, volume), device, reference_repeats),
            "fast_ms": timed(partial(enc, volume), device, repeats),
        }
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                row["fast_bf16_ms"] = timed(partial(enc, volume), device, repeats)
    row["speedup"] = row["medim_ms"] / row["fast_ms"]
    logger.info("encoder %s", row)
    return row


def one_click(model: Mais, emb, volume, coords, labels, prev, memory) -> torch.Tensor:
    """What the issue times as one click: prompt encoder + memory attention + mask decoder + upsampling and the
    full-resolution refinement."""
    return model.mask_logits(model.predict(emb, coords, labels, prev, memory).low_res_logits, volume, coords, labels)


def bench_clicks(device: torch.device, repeats: int, sizes=(0, 10, 60)) -> list[dict]:
    rows = []
    model = randomise(build_mais(MaisConfig.light())).to(device)
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 384, 8, 8, 8, generator=gen).to(device)
    volume = torch.randn(1, 1, 128, 128, 128, generator=gen).to(device)
    coords = torch.randint(0, 128, (1, 1, 3), generator=gen).float().to(device)
    labels = torch.ones(1, 1, dtype=torch.long, device=device)
    for mode in MEMORY_MODES:
        model.config = MaisConfig.light(memory_mode=mode)
        with torch.inference_mode():
            memory = model.new_memory(1)
            prev = model.predict(emb, coords, labels, None, memory).low_res_logits
            for n in sizes:
                while len(memory) < n:
                    memory.push(model.predict(emb, coords, labels, prev, memory).memory_entry)
                click = partial(one_click, model, emb, volume, coords, labels, prev, memory)
                row = {"mode": mode, "N": n, "click_ms": timed(click, device, repeats, warmup=3)}
                if n == max(sizes):
                    row["memory_bytes"] = memory.nbytes()
                rows.append(row)
                logger.info("click %s", row)
    return rows


def count_parameters() -> list[dict]:
    rows = []
    for cfg in (MaisConfig.sam_med3d(), MaisConfig.light()):
        model = build_mais(cfg, device="meta")
        row = {"config": cfg.name}
        row.update({part: sum(p.numel() for p in getattr(model, part).parameters()) for part in PARTS})
        row["total"] = sum(p.numel() for p in model.parameters())
        rows.append(row)
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of a click and of the fast encoder")
    parser.add_argument("--reference-repeats", type=int, default=2, help="timed runs of medim's encoder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False

    params = count_parameters()
    encoders = [
        bench_encoder(cfg, device, args.repeats, args.reference_repeats)
        for cfg in (MaisConfig.sam_med3d(), MaisConfig.light())
    ]
    clicks = bench_clicks(device, args.repeats)
    header = describe(device)

    print(f"## {header}\n")
    print("| config | " + " | ".join(PARTS) + " | total |")
    print("|---" * (len(PARTS) + 2) + "|")
    for r in params:
        print(
            f"| {r['config']} | " + " | ".join(f"{r[p] / 1e6:.3f} M" for p in PARTS) + f" | {r['total'] / 1e6:.2f} M |"
        )
    print(
        "\n| encoder (fp32) | medim ms | fast ms | speed-up | max abs diff |"
        + (" fast bf16 ms |" if device.type == "cuda" else "")
    )
    print("|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for r in encoders:
        extra = f" {r['fast_bf16_ms']:.1f} |" if "fast_bf16_ms" in r else ""
        times = f"{r['medim_ms']:.1f} | {r['fast_ms']:.1f} | {r['speedup']:.1f}x"
        print(f"| {r['config']} | {times} | {r['max_abs_diff']:.1e} |{extra}")
    print("\n| one click (fp32, light) | N=0 ms | N=10 ms | N=60 ms | memory at N=60 |")
    print("|---|---|---|---|---|")
    for mode in MEMORY_MODES:
        rs = [r for r in clicks if r["mode"] == mode]
        cells = " | ".join(f"{r['click_ms']:.1f}" for r in rs)
        print(f"| {mode} | {cells} | {rs[-1]['memory_bytes'] / 1e6:.2f} MB |")
    if args.json:
        args.json.write_text(
            json.dumps({"device": header, "parameters": params, "encoders": encoders, "clicks": clicks}, indent=1)
        )


if __name__ == "__main__":
    main()
