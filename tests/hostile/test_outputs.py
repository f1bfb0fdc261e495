"""Where exports and embeddings are written: never over an input, a folder or (unasked) an
existing file; whole or not at all; with the permissions of an ordinary new file.

File names are bytes on Linux: a name with a newline or bytes that are not UTF-8 cannot be a
line of a UTF-8 list, so a ``.npy`` output (whose rows a ``.files.txt`` names) refuses them
before any work; ``.parquet`` keeps them exactly (``path_bytes``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simclrkit.embed as embed_module
import simclrkit.export as export_module
from simclrkit.config import ConfigError, load_config
from simclrkit.embed import embed_images, files_list_path
from simclrkit.export import export_checkpoint, load_encoder, model_card_path
from simclrkit.train import pretrain

from conftest import TINY
from hostile import assert_user_error, simclrkit, snapshot

_NEWLINE = b"line\nbreak.png"
_NOT_UTF8 = b"caf\xe9.png"  # Latin-1 e-acute: not a UTF-8 sequence


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 2-step run of the tiny MNIST-5k configuration."""
    run = tmp_path_factory.mktemp("trained") / "run"
    pretrain(load_config("mnist5k", [*TINY, "train.max_steps=2"]), run, quiet=True)
    return run


@pytest.fixture
def checkpoint(run_dir, tmp_path) -> Path:
    """A private copy of the run's checkpoint, outside any run folder."""
    path = tmp_path / "inputs" / "model.pt"
    path.parent.mkdir()
    shutil.copyfile(run_dir / "checkpoints" / "last.pt", path)
    return path


def _no_debris(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]
    assert left == [], left


def _png(path: str | bytes | os.PathLike, shade: int, size: tuple[int, int] = (20, 24)) -> bytes:
    """Writes a grayscale PNG (any name, bytes included); returns its bytes."""
    pixels = (np.arange(size[0] * size[1]).reshape(size) * 7 + shade).astype(np.uint8)
    with open(path, "wb") as handle:
        Image.fromarray(pixels).save(handle, format="PNG")
    with open(path, "rb") as handle:
        return handle.read()


# --------------------------------------------------------------------------------------------
# export: never over an input, a folder or an existing file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "card is the input"])
def test_export_refuses_to_write_over_its_input(checkpoint, tmp_path, how):
    inputs = checkpoint.parent
    if how == "same path":
        out = checkpoint
    elif how == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(checkpoint)
    elif how == "hard link":
        out = tmp_path / "hard.safetensors"
        os.link(checkpoint, out)
    else:  # the card's name (<out>.MODEL_CARD.md) is the input's
        card = inputs / "enc.MODEL_CARD.md"
        checkpoint.rename(card)
        checkpoint, out = card, inputs / "enc"
    before = snapshot(inputs)
    for overwrite in ([], ["--overwrite"]):  # --overwrite never means "over the input"
        result = simclrkit("export", checkpoint, "--format", "safetensors", "--out", out,
                           *overwrite)
        line = assert_user_error(result, "is the input", "choose another --out")
        assert str(checkpoint) in line
    assert snapshot(inputs) == before
    assert load_encoder(checkpoint).feature_dim == 64  # still a checkpoint
    _no_debris(tmp_path)


def test_export_refuses_to_overwrite_the_run_folders_summary(run_dir):
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="is the input"):
        export_checkpoint(run_dir, "safetensors", run_dir / "summary.json", overwrite=True)
    assert snapshot(run_dir) == before


def test_export_to_a_folder_is_refused_with_a_file_name_to_use(checkpoint, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    result = simclrkit("export", checkpoint, "--format", "safetensors", "--out", folder)
    assert_user_error(result, "is a folder", str(folder / "encoder.safetensors"))
    assert list(folder.iterdir()) == []
    # The card's place taken by a folder: refused too, before any work.
    out = tmp_path / "enc.safetensors"
    model_card_path(out).mkdir()
    with pytest.raises(ConfigError, match="model card.*is a folder"):
        export_checkpoint(checkpoint, "safetensors", out, overwrite=True)
    assert not out.exists()
    _no_debris(tmp_path)


def test_an_existing_output_needs_overwrite_and_is_then_replaced_whole(checkpoint, tmp_path):
    out = tmp_path / "enc.safetensors"
    out.write_bytes(b"precious")
    card = model_card_path(out)
    result = simclrkit("export", checkpoint, "--format", "safetensors", "--out", out)
    assert_user_error(result, "already exists", "--overwrite", str(out))
    assert out.read_bytes() == b"precious" and not card.exists()

    # Only the card exists: also refused (the pair is one output).
    out.unlink()
    card.write_text("an older card")
    with pytest.raises(ConfigError, match="model card.*already exists"):
        export_checkpoint(checkpoint, "safetensors", out)
    assert card.read_text() == "an older card" and not out.exists()

    out.write_bytes(b"precious")
    result = simclrkit("export", checkpoint, "--format", "safetensors", "--out", out,
                       "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() != b"precious" and load_encoder(out).feature_dim == 64
    assert card.read_text() != "an older card" and "sha256" in card.read_text()
    _no_debris(tmp_path)


# --------------------------------------------------------------------------------------------
# export: whole or not at all
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_model_card_leaves_no_export(checkpoint, tmp_path, monkeypatch, existing):
    out = tmp_path / "out" / "enc.safetensors"
    out.parent.mkdir()
    if existing:
        out.write_bytes(b"old export")
        model_card_path(out).write_text("old card")
    before = snapshot(out.parent)

    def broken_card(*args, **kwargs):
        raise RuntimeError("the card writer failed")

    monkeypatch.setattr(export_module, "_model_card", broken_card)
    with pytest.raises(RuntimeError, match="card writer failed"):
        export_checkpoint(checkpoint, "safetensors", out, overwrite=existing)
    assert snapshot(out.parent) == before  # no new file, no temporary, the old pair intact
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(before)


def test_a_failed_rename_puts_back_the_files_already_renamed(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "enc.safetensors"
    out.write_bytes(b"old export")
    model_card_path(out).write_text("old card")
    real_replace = os.replace

    def replace(source, destination):
        if str(destination).endswith(".MODEL_CARD.md"):  # the export is already in place
            raise OSError(28, "No space left on device", str(destination))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(checkpoint, "safetensors", out, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert out.read_bytes() == b"old export"
    assert model_card_path(out).read_text() == "old card"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["enc.safetensors", "enc.safetensors.MODEL_CARD.md", "inputs"]
    )


# --------------------------------------------------------------------------------------------
# Permissions: an ordinary new file's (0o666 less the umask)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umasks_permissions(checkpoint, tmp_path, umask):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        written = [
            export_checkpoint(checkpoint, "safetensors", out / "enc.safetensors"),
            export_checkpoint(checkpoint, "torchscript", out / "enc.torchscript.pt"),
        ]
        written += [model_card_path(path) for path in written]
        embed_images(checkpoint, [images], out / "h.npy", device="cpu", quiet=True)
        written += [out / "h.npy", files_list_path(out / "h.npy")]
        pytest.importorskip("pyarrow")
        embed_images(checkpoint, [images], out / "h.parquet", device="cpu", quiet=True)
        written.append(out / "h.parquet")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in written}
    assert modes == {path.name: oct(0o666 & ~umask) for path in written}


# --------------------------------------------------------------------------------------------
# embed: names a .npy list cannot hold, and parquet's exact names
# --------------------------------------------------------------------------------------------


@pytest.fixture
def odd_names(tmp_path) -> tuple[Path, dict[bytes, bytes]]:
    """A folder of real PNGs: an ordinary name, one with a newline, one that is not UTF-8.
    Returns the folder and {file name as bytes: file content}."""
    folder = tmp_path / "images"
    folder.mkdir()
    contents = {}
    for shade, name in enumerate([b"plain.png", _NEWLINE, _NOT_UTF8]):
        contents[name] = _png(os.path.join(os.fsencode(folder), name), 40 * shade)
    return folder, contents


@pytest.mark.parametrize("name, shown", [(_NEWLINE, r"line\nbreak.png"),
                                         (_NOT_UTF8, r"caf\xe9.png")])
def test_npy_refuses_names_its_list_cannot_hold_before_any_work(
    checkpoint, tmp_path, monkeypatch, name, shown
):
    folder = tmp_path / "one"
    folder.mkdir()
    _png(folder / "plain.png", 0)
    _png(os.path.join(os.fsencode(folder), name), 50)
    out = tmp_path / "out" / "h.npy"

    def no_work(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the names were checked")

    monkeypatch.setattr(embed_module, "load_encoder", no_work)
    with pytest.raises(ConfigError) as refused:
        embed_images(checkpoint, [folder], out, device="cpu", quiet=True)
    message = str(refused.value)
    assert shown in message and str(tmp_path / "out" / "h.parquet") in message
    assert "\n" not in message
    assert not out.parent.exists()


def test_npy_refusal_is_one_line_on_the_command_line(checkpoint, odd_names, tmp_path):
    folder, _ = odd_names
    out = tmp_path / "h.npy"
    line = assert_user_error(
        simclrkit("embed", checkpoint, folder, "--out", out, "--device", "cpu"),
        ".parquet", "is not valid UTF-8",
    )
    assert r"caf\xe9.png" in line  # the first such name in sorted order, as Python escapes it
    assert not out.exists() and not files_list_path(out).exists()


def test_parquet_keeps_every_name_exactly(checkpoint, odd_names, tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    folder, contents = odd_names
    out = tmp_path / "h.parquet"
    result = embed_images(checkpoint, [folder], out, device="cpu", quiet=True)
    assert result["count"] == 3 and result["skipped"] == [] and result["files"] is None

    table = parquet.read_table(out)
    names = table.column("path_bytes").to_pylist()
    expected = {os.path.join(os.fsencode(folder), name) for name in contents}
    assert set(names) == expected and len(names) == 3
    readable = table.column("path").to_pylist()
    assert readable == [n.decode("utf-8", "backslashreplace") for n in names]
    encoder = load_encoder(checkpoint)
    embeddings = table.column("embedding").to_pylist()
    for name, row in zip(names, embeddings):
        with open(name, "rb") as handle:  # the stored bytes open the very file
            assert handle.read() == contents[os.path.basename(name)]
        with open(name, "rb") as handle:
            pixels = torch.from_numpy(np.array(Image.open(handle)))[None]
        with torch.no_grad():
            h = encoder(encoder.preprocess(pixels))[0]
        torch.testing.assert_close(torch.tensor(row), h, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# embed: never over an input image
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["named input", "symlink", "hard link"])
def test_embed_refuses_to_write_over_an_input_image(checkpoint, tmp_path, how):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    inputs: list[Path] = [images]
    if how == "named input":  # an image file given by name, whatever its suffix
        out = images / "b.npy"
        _png(out, 90)
        inputs = [images / "a.png", out]
    elif how == "symlink":
        out = tmp_path / "h.npy"
        out.symlink_to(images / "a.png")
    else:
        out = tmp_path / "h.npy"
        os.link(images / "a.png", out)
    before = snapshot(images)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is the input"):
            embed_images(checkpoint, inputs, out, device="cpu", quiet=True, overwrite=overwrite)
    assert snapshot(images) == before
    assert not files_list_path(out).exists()
    _no_debris(tmp_path)


def test_embed_over_an_input_exits_2_on_the_command_line(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    out = tmp_path / "h.npy"
    out.symlink_to(images / "a.png")
    before = snapshot(images)
    result = simclrkit("embed", checkpoint, images, "--out", out, "--overwrite", "--quiet")
    assert_user_error(result, "is the input", str(images / "a.png"))
    assert snapshot(images) == before


def test_embed_existing_output_needs_overwrite(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png", 10)
    out = tmp_path / "h.npy"
    files_list_path(out).write_text("an older list\n")
    with pytest.raises(ConfigError, match="file list.*already exists.*--overwrite"):
        embed_images(checkpoint, [images], out, device="cpu", quiet=True)
    assert files_list_path(out).read_text() == "an older list\n" and not out.exists()
    embed_images(checkpoint, [images], out, device="cpu", quiet=True, overwrite=True)
    assert files_list_path(out).read_text() == f"{images / 'a.png'}\n"
    assert np.load(out).shape == (1, 64)
