"""lib.model's config, builder, weights and import_sam_med3d: SAM-Med3D key/shape conformance, strict checkpoint
loading, configs, MAIS weights files."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.model.average_weights import main as average_weights
from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.import_sam_med3d import load_sam_med3d_checkpoint
from lib.model.weights import WeightsError, load_mais, save_mais

# every key of the released SAM-Med3D-turbo checkpoint with its shape and dtype, listed from the authors' file
OFFICIAL_KEYS_TSV = Path(__file__).parent / "data" / "sam_med3d_turbo_state_dict.tsv"
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def official_shapes() -> dict[str, tuple[int, ...]]:
    lines = OFFICIAL_KEYS_TSV.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape", "dtype"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(dtype == "float32" for _, _, dtype in rows)
    return {key: tuple(int(n) for n in shape.split("x")) for key, shape, _ in rows}


def sam_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in PARTS}


def test_sam_med3d_config_has_every_official_key_and_shape():
    model = build_mais(MaisConfig.sam_med3d(), device="meta")
    ours = {k: tuple(v.shape) for k, v in sam_state(model).items()}
    official = official_shapes()
    assert len(official) == 324
    assert ours == official
    # everything else is the memory attention, which the official checkpoint cannot have
    assert {k.split(".", 1)[0] for k in model.state_dict()} == {*PARTS, "memory_attention"}


def test_official_checkpoint_loads_strictly_and_bad_ones_are_refused_naming_the_key():
    source = build_mais(MaisConfig.sam_med3d())
    target = build_mais(MaisConfig.sam_med3d())
    good = sam_state(source)
    memory_before = {k: v.clone() for k, v in target.memory_attention.state_dict().items()}
    load_sam_med3d_checkpoint(target, {"model_state_dict": good})
    for k, v in sam_state(target).items():
        assert torch.equal(v, good[k]), k
    for k, v in target.memory_attention.state_dict().items():
        assert torch.equal(v, memory_before[k])

    key = "mask_decoder.transformer.layers.1.norm3.weight"
    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        load_sam_med3d_checkpoint(target, {"model_state_dict": missing})
    misshapen = dict(good, **{"image_encoder.blocks.3.attn.rel_pos_h": torch.zeros(15, 64)})
    with pytest.raises(WeightsError, match=r"'image_encoder.blocks.3.attn.rel_pos_h' has shape \(15, 64\)"):
        load_sam_med3d_checkpoint(target, {"model_state_dict": misshapen})
    extra = dict(good, **{"image_encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unexpected key 'image_encoder.extra.weight'"):
        load_sam_med3d_checkpoint(target, {"model_state_dict": extra})
    with pytest.raises(WeightsError, match="not a SAM-Med3D checkpoint"):
        load_sam_med3d_checkpoint(target, {"state_dict": good})


def test_official_checkpoint_file_parts_and_trust(tmp_path):
    """A light model takes SAM-Med3D's prompt encoder and decoder; pickled extras need trusted=True."""
    source = build_mais(MaisConfig.sam_med3d())
    decoder_state = {k: v for k, v in sam_state(source).items() if not k.startswith("image_encoder.")}
    path = tmp_path / "turbo_like.pth"
    torch.save({"model_state_dict": decoder_state, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    light = build_mais(MaisConfig.light())
    with pytest.raises(WeightsError, match="trusted=True"):
        load_sam_med3d_checkpoint(light, path, parts=("prompt_encoder", "mask_decoder"))
    load_sam_med3d_checkpoint(light, path, parts=("prompt_encoder", "mask_decoder"), trusted=True)
    for k, v in decoder_state.items():
        assert torch.equal(light.state_dict()[k], v), k
    with pytest.raises(WeightsError, match="missing key 'image_encoder."):
        load_sam_med3d_checkpoint(light, path, trusted=True)


def test_config_round_trip_and_validation():
    for cfg in (MaisConfig.light(), MaisConfig.sam_med3d(memory_mode="dense", memory_size=10)):
        assert MaisConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="memory_mode"):
        MaisConfig.light(memory_mode="everything")
    with pytest.raises(ValueError, match="memory_dtype"):
        MaisConfig.light(memory_dtype="float17")
    with pytest.raises(ValueError, match="invalid MAIS config"):
        MaisConfig.from_dict({**MaisConfig.light().to_dict(), "colour": "blue"})


def test_the_network_config_loads_without_torch():
    """Option schemas (the app's --conf, the training command line) read lib.model.config: it must stay light."""
    app_dir = Path(__file__).resolve().parents[1] / "apps" / "mais"
    script = "import sys, lib.model.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    loaded = subprocess.run([sys.executable, "-c", script], cwd=app_dir, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_mais_file_round_trip_with_mode_override(tmp_path):
    model = build_mais(MaisConfig.light(memory_mode="sparse", memory_size=12))
    with torch.no_grad():
        model.memory_attention.out_proj.weight.normal_()
    path = save_mais(model, tmp_path / "sub" / "mais.pt", metadata={"epochs": 3, "note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["mais.pt"]  # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "mais" and payload["metadata"] == {"epochs": 3, "note": "test"}

    loaded = load_mais(path)
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert load_mais(path, memory_mode="both").config.memory_mode == "both"
    with pytest.raises(WeightsError, match="memory_mode"):
        load_mais(path, memory_mode="all")


def test_mais_file_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_mais(tmp_path / "absent.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match="not a readable torch weights file"):
        load_mais(text)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(WeightsError, match="not a MAIS weights file"):
        load_mais(other)
    assert issubclass(WeightsError, ValueError)

    model = build_mais(MaisConfig.light(memory_size=4))
    path = save_mais(model, tmp_path / "mais.pt")
    payload = torch.load(path, weights_only=True)
    key = "memory_attention.dense_age_key"
    del payload["model_state_dict"][key]
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        load_mais(path)
    payload["model_state_dict"][key] = torch.zeros(3, 64)
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=rf"key '{key}' has shape \(3, 64\), the model expects \(5, 64\)"):
        load_mais(path)


def test_average_command_writes_the_mean_of_one_networks_weights(tmp_path):
    """A weight soup of checkpoints (lib.model.average_weights): each weight the mean of the files', the
    network and the first file's metadata kept; files of another network are refused."""
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_mais(MaisConfig.light(memory_size=4))
        with torch.no_grad():
            model.memory_attention.out_proj.weight.normal_()
        paths.append(save_mais(model, tmp_path / f"run{seed}.pt", metadata={"seed": seed}))
    average_weights([str(tmp_path / "mean.pt"), *map(str, paths)])

    mean = load_mais(tmp_path / "mean.pt")
    runs = [load_mais(path).state_dict() for path in paths]
    key = "memory_attention.out_proj.weight"
    assert not torch.equal(runs[0][key], runs[1][key])
    torch.testing.assert_close(mean.state_dict()[key], sum(run[key] for run in runs) / 3)
    metadata = torch.load(tmp_path / "mean.pt", weights_only=True)["metadata"]
    assert metadata == {"seed": 0, "averaged_from": ["run0.pt", "run1.pt", "run2.pt"]}
    other = save_mais(build_mais(MaisConfig.light(memory_size=8)), tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        average_weights([str(tmp_path / "x.pt"), str(paths[0]), str(other)])
    with pytest.raises(SystemExit):
        average_weights([str(tmp_path / "x.pt"), str(paths[0])])
    assert not (tmp_path / "x.pt").exists()


def test_import_command_turns_an_official_checkpoint_into_a_served_weights_file(tmp_path):
    """What a user does with their own sam_med3d_turbo.pth (README): same predictions as the checkpoint."""
    from lib.model.import_sam_med3d import main as import_sam_med3d

    official = build_mais(MaisConfig.sam_med3d())
    checkpoint = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": sam_state(official), "args": argparse.Namespace(lr=8e-5)}, checkpoint)
    imported_path = tmp_path / "sam_med3d_turbo_mais.pt"
    import_sam_med3d([str(checkpoint), str(imported_path), "--trusted"])

    imported = load_mais(imported_path)
    assert imported.config.name == "sam_med3d" and imported.memory_mode == "none"
    for key, value in sam_state(official).items():
        assert torch.equal(imported.state_dict()[key], value), key
