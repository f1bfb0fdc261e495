"""The command line: subcommands reach the library and user errors exit 2 without a traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from simclrkit.cli import main

from conftest import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--run-dir", str(run_dir), "--quiet", *TINY]) == 0
    return run_dir


def test_recipes_lists_every_bundled_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist5k", "cifar10_r18", "imagenet_r50_linear", "fashion_mnist_cpu"):
        assert name in out


def test_export_and_embed_commands(run_dir, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(run_dir / "checkpoints" / "last.pt"), "--format", "safetensors",
                 "--out", str(out)]) == 0
    assert out.exists() and "model card" in capsys.readouterr().out

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    embeddings = tmp_path / "h.npy"
    code = main(["embed", str(out), str(folder), "--out", str(embeddings), "--quiet"])
    assert code == 0
    h = np.load(embeddings)
    captured = capsys.readouterr()
    assert h.shape[0] == 3 and "skipped 1" in captured.out and "broken.png" in captured.err
    # the exported encoder's h equals the checkpoint's encoder on the same image
    from simclrkit import load_encoder

    encoder = load_encoder(run_dir / "checkpoints" / "last.pt")
    image = torch.from_numpy(np.array(Image.open(folder / "1.png")))[None]
    with torch.no_grad():
        expected = encoder(encoder.preprocess(image))[0].numpy()
    np.testing.assert_allclose(h[1], expected, rtol=1e-5, atol=1e-6)


def test_export_refuses_an_impossible_torchvision_export(run_dir, tmp_path, capsys):
    code = main(["export", str(run_dir), "--format", "torchvision", "--out", str(tmp_path / "x.pt")])
    assert code == 2 and "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    code = main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "a")])
    assert code == 2 and "not found" in capsys.readouterr().err


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_the_command_enables_huge_pages_for_torch_unless_told_otherwise(preset, expected):
    # PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation: the command sets it before
    # anything imports torch (importing the CLI must not), and a value the user set wins.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    script = (
        "import os, sys\n"
        "sys.argv = ['simclrkit', 'recipes']\n"
        "from simclrkit import cli\n"
        "early = 'torch' in sys.modules\n"
        "try:\n    cli.entry()\nexcept SystemExit:\n    pass\n"
        "print('torch imported:', early, os.environ['THP_MEM_ALLOC_ENABLE'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == f"torch imported: False {expected}"
