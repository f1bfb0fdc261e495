"""Export, loading and embedding: every format gives the encoder's own h, bad files are refused.

Two checkpoints, made once per module: a real 8-step MNIST-5k run (grayscale, CIFAR stem,
width 0.125) and an untrained ResNet-18 in the torchvision layout (width 1, ImageNet stem,
RGB) whose BatchNorm parameters and statistics are randomised, so that a mistake in any
tensor's mapping changes the features.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2.functional import rgb_to_grayscale

import simclrkit
from simclrkit.augment import apply_eval
from simclrkit.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save
from simclrkit.config import ConfigError, load_config
from simclrkit.embed import embed_images
from simclrkit.export import (
    Preprocess,
    _match_channels,
    _torchvision_blockers,
    export_checkpoint,
    load_encoder,
    model_card_path,
)
from simclrkit.models import build_model
from simclrkit.train import pretrain

_LINEAR_TOP1 = 0.8765  # written into summary.json, as if the run had been evaluated
_WIDE_ARCH = {
    "encoder": "resnet18",
    "width": 1.0,
    "in_channels": 3,
    "cifar_stem": False,
    "image_size": 64,
    "head": "nonlinear",
    "head_layers": 2,
    "proj_dim": 128,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run folder: checkpoints at steps 4 and 8, summary.json with evaluation numbers."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    overrides = [
        "model.width=0.125",
        "data.image_size=16",
        "train.batch_size=32",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "optim.warmup_epochs=0.02",
        "eval.linear=false",
    ]
    pretrain(load_config("mnist5k", overrides), run_dir, quiet=True)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["eval"] = {"linear_top1": _LINEAR_TOP1, "linear_top5": 0.9912, "eval_seconds": 3.5}
    summary_path.write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_run):
    return tiny_run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """An untrained torchvision-compatible encoder saved in the training checkpoint format."""
    torch.manual_seed(0)
    model = build_model(_WIDE_ARCH)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    path = tmp_path_factory.mktemp("wide") / "wide.pt"
    atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "step": 0,
            "encoder": model.encoder.state_dict(),
            "head": model.head.state_dict(),
            "architecture": _WIDE_ARCH,
        },
        path,
    )
    return path


def _images(arch: dict, batch: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, arch["in_channels"], arch["image_size"], arch["image_size"])
    return torch.rand(shape, generator=generator)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


def test_torchvision_export_loads_into_resnet18_and_gives_the_same_features(
    wide_checkpoint, tmp_path
):
    out = export_checkpoint(wide_checkpoint, "torchvision", tmp_path / "resnet18.pt")
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())

    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    x = _images(_WIDE_ARCH, 2)
    untrained_h = reference.eval()(x)

    model = torchvision.models.resnet18()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    model.fc = torch.nn.Identity()
    encoder = load_encoder(wide_checkpoint)
    with torch.no_grad():
        expected = encoder(x)
        got = model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(untrained_h, expected, atol=1e-2)  # the weights did load


def test_torchvision_export_is_refused_for_a_cifar_stem_narrow_grayscale_encoder(
    tiny_checkpoint, tmp_path
):
    out = tmp_path / "tv.pt"
    with pytest.raises(ConfigError) as refused:
        export_checkpoint(tiny_checkpoint, "torchvision", out)
    message = str(refused.value)
    for reason in ("width 0.125", "CIFAR stem", "(64, 3, 7, 7)", "1 input channel", "safetensors"):
        assert reason in message
    assert not out.exists() and not model_card_path(out).exists()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"width": 2.0}, "width 2.0"),
        ({"cifar_stem": True}, "CIFAR stem"),
        ({"in_channels": 1}, "1 input"),
    ],
)
def test_each_torchvision_blocker_is_named_alone(change, reason):
    assert _torchvision_blockers(_WIDE_ARCH) == []
    blockers = _torchvision_blockers({**_WIDE_ARCH, **change})
    assert len(blockers) == 1 and reason in blockers[0]


# --------------------------------------------------------------------------------------------
# safetensors, TorchScript, ONNX
# --------------------------------------------------------------------------------------------


def test_safetensors_round_trip_is_exact(tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = export_checkpoint(
        tiny_checkpoint, "safetensors", tmp_path / "enc.safetensors", include_head=True
    )
    state = torch.load(tiny_checkpoint, weights_only=True)
    stored = load_file(out)
    expected = {f"encoder.{k}": v for k, v in state["encoder"].items()}
    expected.update({f"head.{k}": v for k, v in state["head"].items()})
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "simclrkit-encoder"
    assert json.loads(metadata["architecture"]) == state["architecture"]
    preprocessing = json.loads(metadata["preprocessing"])
    assert (preprocessing["image_size"], preprocessing["in_channels"]) == (16, 1)
    assert json.loads(metadata["evaluation"])["linear_top1"] == _LINEAR_TOP1

    from_export, from_checkpoint = load_encoder(out), load_encoder(tiny_checkpoint)
    assert not from_export.training and from_export.feature_dim == 64
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        h = from_export(from_export.preprocess(images))
        assert torch.equal(h, from_checkpoint(from_checkpoint.preprocess(images)))
    assert h.shape == (5, 64)


@pytest.fixture(scope="module")
def torchscript_export(tiny_checkpoint, tmp_path_factory):
    return export_checkpoint(
        tiny_checkpoint, "torchscript", tmp_path_factory.mktemp("ts") / "enc.torchscript"
    )


def test_torchscript_export_agrees_with_the_encoder(tiny_checkpoint, torchscript_export):
    out = torchscript_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out))
    encoder = load_encoder(tiny_checkpoint)
    x = _images(encoder.architecture, 5)  # not the traced batch size (2)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), encoder(x), rtol=0, atol=1e-5)


def test_onnx_export_agrees_with_the_encoder(tiny_checkpoint, tmp_path):
    out = tmp_path / "enc.onnx"
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ConfigError, match="pip install"):
            export_checkpoint(tiny_checkpoint, "onnx", out)
        pytest.skip("onnx/onnxscript not installed: only the error message was checked")
    export_checkpoint(tiny_checkpoint, "onnx", out)
    # One self-contained file: no external-data or temporary files are left beside it.
    assert {p.name for p in tmp_path.iterdir()} == {"enc.onnx", "enc.onnx.MODEL_CARD.md"}
    onnxruntime = pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed: no numeric check"
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    encoder = load_encoder(tiny_checkpoint)
    for batch in (1, 4):  # the batch axis is dynamic
        x = _images(encoder.architecture, batch, seed=batch)
        got = torch.from_numpy(session.run(["h"], {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, encoder(x), rtol=0, atol=1e-5)


def test_an_export_that_fails_its_check_leaves_no_file(tiny_checkpoint, tmp_path, monkeypatch):
    import simclrkit.export as export_module

    def disagree(*args):
        raise RuntimeError("the TorchScript export disagrees with the encoder")

    monkeypatch.setattr(export_module, "_check_agreement", disagree)
    with pytest.raises(RuntimeError, match="disagrees"):
        export_checkpoint(tiny_checkpoint, "torchscript", tmp_path / "enc.torchscript")
    assert list(tmp_path.iterdir()) == []  # neither the file, a temporary, nor a card


def test_export_argument_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="allowed: torchvision, safetensors"):
        export_checkpoint(tiny_checkpoint, "keras", tmp_path / "x")
    with pytest.raises(ConfigError, match="only the safetensors format"):
        export_checkpoint(tiny_checkpoint, "torchscript", tmp_path / "x", include_head=True)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def test_model_card_describes_the_model_and_only_its_own_evaluation(tiny_run, tmp_path):
    checkpoints = tiny_run / "checkpoints"
    last = export_checkpoint(checkpoints / "last.pt", "safetensors", tmp_path / "last.safetensors")
    card = model_card_path(last).read_text()
    assert model_card_path(last).name == "last.safetensors.MODEL_CARD.md"
    facts = ("resnet18", "width 0.125", "h of size 64", "CIFAR", "mnist5k", "4,000", "0.8765")
    for fact in (*facts, "0.9912"):
        assert fact in card, fact
    assert "eval_seconds" not in card
    assert "simclrkit.load_encoder(" in card and "no mean/std" in card.lower()

    # The summary's numbers belong to step 8; the step-4 checkpoint must not claim them.
    middle = export_checkpoint(
        checkpoints / "step-000000004.pt", "safetensors", tmp_path / "step4.safetensors"
    )
    card = model_card_path(middle).read_text()
    assert "0.8765" not in card and "No evaluation" in card and "step 4" in card


# --------------------------------------------------------------------------------------------
# Loading and preprocessing
# --------------------------------------------------------------------------------------------


def test_wrong_files_are_refused_with_what_was_expected(torchscript_export, tmp_path):
    from safetensors.torch import save_file

    a_dict = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, a_dict)
    bare = tmp_path / "bare.safetensors"
    save_file({"conv1.weight": torch.ones(2, 2)}, str(bare))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    for path, says in [
        (a_dict, "no format_version"),
        (bare, "without simclrkit metadata"),
        (text, "neither a PyTorch nor a safetensors file"),
        (torchscript_export, "TorchScript"),
    ]:
        with pytest.raises(CheckpointError) as refused:
            load_encoder(path)
        message = str(refused.value)
        assert says in message and "expected a simclrkit training checkpoint" in message, message
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "missing.pt")


def test_load_encoder_is_reachable_from_the_package_and_accepts_a_run_folder(tiny_run):
    encoder = simclrkit.load_encoder(tiny_run)
    assert encoder.architecture["in_channels"] == 1 and encoder.feature_dim == 64
    assert encoder.preprocess == Preprocess(16, 1, "cpu")


def test_channel_conversion_matches_hand_computed_luma():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
    rgb[1] = 0.25  # a gray picture stored as RGB keeps its value exactly
    gray = _match_channels(rgb, 1)
    assert gray.shape == (2, 1, 2, 2)
    torch.testing.assert_close(gray[0], torch.full((1, 2, 2), 0.2989), rtol=0, atol=1e-4)
    assert torch.equal(gray[1], torch.full((1, 2, 2), 0.25))
    uint8_gray = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    uint8_gray[:, 1:] = uint8_gray[:, :1]
    assert torch.equal(_match_channels(uint8_gray, 1), uint8_gray[:, :1])
    assert torch.equal(_match_channels(uint8_gray[:, :1], 3), uint8_gray)
    with pytest.raises(ValueError, match="alpha"):
        _match_channels(torch.zeros(1, 4, 2, 2), 3)


def test_preprocess_accepts_pil_images_tensors_and_lists_of_any_size():
    preprocess = Preprocess(image_size=40, in_channels=3)
    pixels = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    expected = apply_eval(pixels[None], 40, train=False)  # centre crop 0.875 above 32 px
    assert torch.equal(preprocess(pil), expected)
    assert torch.equal(preprocess(pixels), expected)
    mixed = preprocess([pixels, torch.rand(1, 30, 20)])
    assert mixed.shape == (2, 3, 40, 40)
    assert torch.equal(mixed[:1], expected)


# --------------------------------------------------------------------------------------------
# Embedding folders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """Three good images (gray PNG, RGB PNG, RGB JPEG in a subfolder) and two bad files."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    generator = np.random.default_rng(0)
    gray = generator.integers(0, 256, (20, 24), dtype=np.uint8)
    rgb = generator.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(gray).save(root / "a_gray.png")
    Image.fromarray(rgb).save(root / "b_rgb.png")
    jpeg_pixels = generator.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(jpeg_pixels).save(root / "sub" / "c.jpg")
    jpeg = (root / "sub" / "c.jpg").read_bytes()
    (root / "d_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "e_empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image, not listed")
    return root, gray, rgb


def test_embed_folder_skips_bad_files_and_matches_the_encoder(
    tiny_checkpoint, image_folder, tmp_path, capsys
):
    root, gray, rgb = image_folder
    out = tmp_path / "emb.npy"
    result = embed_images(tiny_checkpoint, [root], out, batch_size=2, device="cpu")

    good = [str(root / "a_gray.png"), str(root / "b_rgb.png"), str(root / "sub" / "c.jpg")]
    bad = [str(root / "d_truncated.jpg"), str(root / "e_empty.png")]
    assert result["count"] == 3 and result["dim"] == 64 and result["out"] == str(out)
    assert [item["path"] for item in result["skipped"]] == bad
    assert "truncated" in result["skipped"][0]["reason"]
    assert "0 bytes" in result["skipped"][1]["reason"]
    stderr = capsys.readouterr().err
    assert all(stderr.count(path) == 1 for path in bad)

    h = np.load(out)
    assert h.dtype == np.float32 and h.shape == (3, 64)
    assert (tmp_path / "emb.npy.files.txt").read_text().splitlines() == good

    encoder = load_encoder(tiny_checkpoint)
    with torch.no_grad():
        # Written straight from the pixels, independent of Preprocess: the gray file as is,
        # the RGB one through the standard luma weights.
        gray_h = encoder(apply_eval(torch.from_numpy(gray)[None, None], 16, train=False))
        rgb_float = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        rgb_h = encoder(apply_eval(rgb_to_grayscale(rgb_float), 16, train=False))
        jpeg_h = encoder(encoder.preprocess(Image.open(good[2])))
    torch.testing.assert_close(torch.from_numpy(h[0]), gray_h[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(h[1]), rgb_h[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(h[2]), jpeg_h[0], rtol=0, atol=1e-5)

    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ConfigError, match="pip install pyarrow"):
            embed_images(tiny_checkpoint, [root], tmp_path / "emb.parquet", quiet=True)
        return
    import pyarrow.parquet as parquet

    again = embed_images(tiny_checkpoint, good, tmp_path / "emb.parquet", device="cpu", quiet=True)
    assert again["count"] == 3 and again["skipped"] == []
    table = parquet.read_table(tmp_path / "emb.parquet")
    assert table.column("path").to_pylist() == good
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    parquet_h = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(parquet_h, h, rtol=1e-5, atol=1e-5)  # other batches: rounding only


def test_embed_argument_errors(tiny_checkpoint, image_folder, tmp_path):
    root, _, _ = image_folder
    with pytest.raises(ConfigError, match=r"\.npy or \.parquet"):
        embed_images(tiny_checkpoint, [root], tmp_path / "emb.csv")
    with pytest.raises(ConfigError, match="neither a file nor a folder"):
        embed_images(tiny_checkpoint, [tmp_path / "nowhere"], tmp_path / "emb.npy")
    with pytest.raises(ConfigError, match="could be decoded"):
        embed_images(tiny_checkpoint, [root / "e_empty.png"], tmp_path / "emb.npy", quiet=True)
    assert not (tmp_path / "emb.npy").exists()
