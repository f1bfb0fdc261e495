"""The data a run trains on: listed once into the run folder, checked on resume, one for all.

For file datasets the run's list of images is a :class:`~simclrkit.index.DataIndex` that the
main process builds (a listing of ``data.root``, or the prebuilt ``data.index``), checks if
asked (``data.check_files``) and writes to ``RUN_DIR/data_index.npz``; every other process
reads that file and checks that its fingerprint is the one the main process announced. A
resume or a torchrun restart lists the data again (a listing, seconds even at ImageNet size)
and compares it with the recorded list:

* the same (fingerprint of the listing or of the recorded list): the recorded list is used,
  so the order of images, the schedule and the shuffle are exactly those of the first start;
* different: the resume is refused (exit code 2) with what changed (files added, removed,
  relabelled), unless ``--force``, which trains on the data as it is now; or
  ``data.index=RUN_DIR/data_index.npz`` continues on the recorded list as it was (files gone
  since are then found bad when read, and replaced).

The checkpoint records the count and the fingerprint of the list (:meth:`DataIndex.record`); a
recorded list that no longer matches it is refused the same way. Images held in memory
(MNIST, CIFAR, STL-10) are loaded by every process, and their record fingerprints the array
(a strided sample of it, so STL-10's 2.9 GB cost no more than 16 MB of hashing).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from simclrkit import distributed
from simclrkit.config import FILE_DATASETS, Config, ConfigError
from simclrkit.data import ImageArray, ImageFiles, load_run_data
from simclrkit.errors import UserError, describe
from simclrkit.imagefiles import load_image_files
from simclrkit.index import DataIndex, build_index, load_index

INDEX_NAME = "data_index.npz"
_HASHED_BYTES = 16 << 20


def array_record(data: ImageArray) -> dict[str, Any]:
    """Count and fingerprint of images held in memory."""
    images = data.images
    step = max(1, images.numel() * images.element_size() // _HASHED_BYTES)
    digest = hashlib.sha256(f"{data.name}/{data.split}/{tuple(images.shape)}".encode())
    digest.update(images[::step].contiguous().numpy().tobytes())
    if data.labels is not None:
        digest.update(data.labels.numpy().tobytes())
    return {"num_examples": len(data), "fingerprint": digest.hexdigest()}


def prepare_train_data(
    config: Config,
    run_dir: Path,
    saved: dict[str, Any] | None,
    *,
    resuming: bool,
    force: bool,
    info: distributed.DistInfo,
    quiet: bool = True,
) -> tuple[ImageArray | ImageFiles, dict[str, Any]]:
    """The pretraining images of a run and their record for checkpoints.

    Args:
        config: the run's config.
        run_dir: the run folder (the main process writes the index there).
        saved: the checkpoint's data record when resuming (None: fresh, or a checkpoint from
            before records existed, which is then accepted).
        resuming: a resume or a torchrun restart (the recorded list is used if it matches).
        force: accept data that differs from the recorded list.
        info: this process's place in the job.

    Raises:
        ConfigError: on every process alike: unreadable data, a changed dataset without
            ``force``, too many bad files found by a check.
    """
    if config.data.dataset not in FILE_DATASETS:
        data = load_run_data(config, "pretrain", quiet=quiet)
        record = array_record(data)
        if saved and saved.get("fingerprint") != record["fingerprint"] and not force:
            raise ConfigError(
                f"--resume: the {data.name} images differ from the checkpoint's "
                f"({saved.get('num_examples')} -> {record['num_examples']} images, or their "
                "content); pass --force to resume anyway"
            )
        return data, record
    outcome: tuple[str, str] | None = None
    index = None
    if info.is_main:
        try:
            index = _main_index(config, run_dir, saved, resuming=resuming, force=force)
            outcome = ("ok", index.fingerprint)
        except (UserError, OSError) as error:  # every process stops with rank 0's reason
            outcome = ("error", describe(error))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    if index is None:
        index = _rerooted(load_index(run_dir / INDEX_NAME, key="run folder"), config)
        if index.fingerprint != outcome[1]:
            raise ConfigError(
                f"--run-dir: {run_dir / INDEX_NAME} is not the list the main process wrote; "
                "the run folder must be one folder that every process sees (a shared filesystem)"
            )
    return _files(config, index), index.record()


def _files(config: Config, index: DataIndex, check: str = "none") -> ImageFiles:
    files = load_image_files(
        index, name=config.data.dataset, split="train", check=check,
        max_bad_fraction=config.data.max_bad_fraction, reduced_decode=config.data.reduced_decode,
        quiet=True,
    )
    if check == "none" and index.meta.get("checked_out"):
        # Left out by the check at the first start: still part of this run's summary.
        files.skipped_files = tuple(index.meta["checked_out"])
        files.skipped = len(files.skipped_files)
    return files


def _current_listing(config: Config) -> DataIndex:
    data = config.data
    if data.index:
        index = load_index(data.index)
        if index.dataset != data.dataset:
            raise ConfigError(
                f"data.index: {data.index} lists a '{index.dataset}' dataset, but data.dataset "
                f"is '{data.dataset}'; set data.dataset={index.dataset}"
            )
        return _rerooted(index, config)
    return build_index(data.dataset, data.root, "train")


def _rerooted(index: DataIndex, config: Config) -> DataIndex:
    """The recorded names under the configured root (a dataset moved to another mount)."""
    root = config.data.root
    if root and config.data.dataset != "filelist" and not config.data.index:
        return replace(index, root=str(Path(root).expanduser()))
    return index


def _main_index(
    config: Config, run_dir: Path, saved: dict[str, Any] | None, *, resuming: bool, force: bool
) -> DataIndex:
    """Builds or checks the run's index on the main process and writes it into the run folder."""
    path = run_dir / INDEX_NAME
    current = _current_listing(config)
    recorded = None
    if resuming and path.is_file():
        recorded = _rerooted(load_index(path, key="run folder"), config)
        accepted = {recorded.fingerprint, recorded.meta.get("listing")}
        if current.fingerprint in accepted:
            if saved and saved.get("fingerprint") not in (None, recorded.fingerprint) and not force:
                raise ConfigError(
                    f"--resume: {path} is not the list the checkpoint trained on (its "
                    f"fingerprint differs); restore it, or pass --force to resume on it"
                )
            return recorded
        if not force:
            raise ConfigError(
                f"--resume: the data changed since the run started: {current.difference(recorded)}. "
                "Pass --force to train on the data as it is now (the order of the images changes "
                f"from here on), or data.index={path} to continue exactly on the recorded list "
                "(files that are gone are then replaced as bad files when read)"
            )
    elif resuming and saved and saved.get("fingerprint") != current.fingerprint and not force:
        raise ConfigError(
            f"--resume: {path} is missing and the data differs from the checkpoint's "
            f"({saved.get('num_examples')} -> {len(current)} images); pass --force to resume on "
            "the data as it is now"
        )
    index = current
    if config.data.check_files != "none":
        checked = _files(config, current, check=config.data.check_files)
        index = replace(checked.index, meta={
            **checked.index.meta, "listing": current.fingerprint,
            "checked_out": list(checked.skipped_files),
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    return index
