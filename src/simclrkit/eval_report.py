"""Evaluating a checkpoint: run the protocols of ``evaluate.py``/``finetune.py``, write the report.

:func:`evaluate_checkpoint` loads a trained network (``export.read_trained``), runs the chosen protocols (linear,
kNN, fine-tuning; SPEC §7) on the labelled train/test splits of the checkpoint's dataset (or
another one), and writes into ``RUN_DIR/eval``:

* ``eval.json``: every result, with the protocol's settings and timings;
* ``eval.md``: the results table (:func:`format_results_table`) and the plots;
* ``embedding_tsne.png``: a t-SNE map of test-set h coloured by class;
* ``confusion_matrix.png``: of the linear protocol's test predictions;
* ``label_subset_<pct>pct_seed<seed>.json``: the images fine-tuning was allowed to see;
* ``finetuned_<pct>pct_seed<seed>.pt``: the fine-tuned network (``classifier.py``), the
  teacher ``simclrkit distill`` takes.

Each number comes with context: the same architecture at random initialisation (its BN
statistics measured on the training split first), and for the frozen-feature protocols raw
pixels.

Budget: the defaults keep ``protocols="all"`` on the default MNIST-5k run (ResNet-18 at
width 0.25, 28 px) near 50 s on a 2-core CPU (measured with one torch thread: linear 17 s,
kNN 0.2 s, fine-tuning 30 s, t-SNE the rest). They are: L-BFGS for the linear protocol, and
on a CPU fine-tuning for half the paper's epochs (15 at 10% labels). The paper's SGD linear
protocol with crops (``linear_protocol=sgd``, 30 epochs by default, the paper's 90 via
``linear_epochs``) pushes every epoch's crops through the encoder: about 3.5 s per epoch
of MNIST-5k on a CPU, so ~2 minutes per network for 30 epochs (the random-initialisation
twin doubles it); ``linear_augment=false`` trains on cached features in seconds. Every
setting is an :class:`EvalSettings` field.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from simclrkit import config as config_lib
from simclrkit import distributed, evaluate
from simclrkit import finetune as finetune_lib
from simclrkit.checkpoint import FORMAT_VERSION, atomic_save
from simclrkit.config import Config, ConfigError, DataConfig
from simclrkit.data import load_dataset
from simclrkit.devices import select_device
from simclrkit.evaluate import Source
from simclrkit.export import build_model_from, read_trained
from simclrkit.models import SimCLR, build_model

PROTOCOLS = ("linear", "knn", "finetune")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Settings of :func:`evaluate_checkpoint` (override keys are the field names).

    Attributes:
        dataset: labelled dataset to evaluate on; None: the checkpoint's.
        root: its files; None: the checkpoint's root when the dataset is the same.
        max_bad_fraction: the largest fraction of undecodable image files skipped with a
            warning rather than refused; None: the checkpoint's ``data.max_bad_fraction``, so
            a folder the run trained on is evaluated under the tolerance it was given.
        batch_size: images per forward pass when computing features.
        linear_protocol: "lbfgs" (cached features, logistic regression) or "sgd" (paper).
        linear_epochs, linear_batch_size, linear_base_lr: the "sgd" protocol (paper: 90
            epochs, lr 0.1 * B / 256); 30 epochs by default for CPU budgets.
        linear_augment: "sgd" on crop + flip views (paper) or on cached features (fast).
        knn_k, knn_temperature: weighted kNN (InstDisc: 200 and 0.1).
        finetune_epochs: None: 60 (<= 1% labels) / 30 epochs as the paper, half on a CPU.
        finetune_protocol: "v1" (Nesterov SGD, lr 0.05 * B / 256; SimCLR App. B.5), "v2"
            (LARS, lr 0.005 * sqrt(B); SimCLRv2) or "auto": v2 for checkpoints with a
            nonlinear head of 3 or more layers (SimCLRv2's), v1 otherwise.
        finetune_batch_size, finetune_base_lr: fine-tuning's batch and base learning rate
            (None: the protocol's). B = 64 by default: label subsets of small datasets are
            small (10% of MNIST-5k is 400 images), and B = 256 would leave two steps per
            epoch.
        ft_proj_selector: projection-head layers kept under the fine-tuning classifier
            (SimCLRv2 uses 1 with a 3-layer head; 0: the classifier sits on h); None: the
            run's own ``eval.ft_proj_selector`` (its recipe's choice).
        random_init_baseline, raw_pixels_baseline: compute the context baselines.
        tsne_points: test points in the t-SNE map (0: no map).
    """

    dataset: str | None = None
    root: str | None = None
    max_bad_fraction: float | None = None
    batch_size: int = 512
    linear_protocol: Literal["lbfgs", "sgd"] = "lbfgs"
    linear_epochs: int = 30
    linear_batch_size: int = 256
    linear_base_lr: float = 0.1
    linear_augment: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    finetune_epochs: int | None = None
    finetune_protocol: Literal["auto", "v1", "v2"] = "auto"
    finetune_batch_size: int = 64
    finetune_base_lr: float | None = None
    ft_proj_selector: int | None = None
    random_init_baseline: bool = True
    raw_pixels_baseline: bool = True
    tsne_points: int = 2000

    def __post_init__(self) -> None:
        if self.dataset is not None:
            DataConfig(dataset=self.dataset, root=self.root)  # validates name and root
        if self.max_bad_fraction is not None:
            DataConfig(max_bad_fraction=self.max_bad_fraction)  # validates the fraction
        positive = ("batch_size", "linear_epochs", "linear_batch_size", "linear_base_lr",
                    "knn_k", "knn_temperature", "finetune_batch_size", "finetune_base_lr")
        if self.finetune_protocol not in ("auto", *finetune_lib.FINETUNE_PROTOCOLS):
            raise ConfigError(
                f"eval.finetune_protocol: got {self.finetune_protocol!r}; allowed: auto, "
                + ", ".join(finetune_lib.FINETUNE_PROTOCOLS)
            )
        for key in positive:
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"eval.{key}: got {getattr(self, key)}; allowed: a number > 0")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            raise ConfigError(f"eval.finetune_epochs: got {self.finetune_epochs}; allowed: >= 1")
        for key in ("ft_proj_selector", "tsne_points"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"eval.{key}: got {getattr(self, key)}; allowed: >= 0")


# Dotted config keys accepted as aliases of settings fields.
_ALIASES = {
    "data.dataset": "dataset", "data.root": "root", "data.max_bad_fraction": "max_bad_fraction",
}


def eval_settings(overrides: Any = None) -> EvalSettings:
    """Builds :class:`EvalSettings` from None, a mapping, ``KEY=VALUE`` strings or a Config.

    Keys are the field names, optionally prefixed ``eval.``; ``data.dataset`` and
    ``data.root`` are accepted too. A :class:`~simclrkit.config.Config` contributes its data
    section and ``eval.batch_size`` / ``eval.random_init_baseline``.

    Raises:
        ConfigError: an unknown key or a bad value (the message names the key).
    """
    if overrides is None or isinstance(overrides, EvalSettings):
        return overrides or EvalSettings()
    if isinstance(overrides, Config):
        overrides = {
            "dataset": overrides.data.dataset,
            "root": overrides.data.root,
            "max_bad_fraction": overrides.data.max_bad_fraction,
            "batch_size": overrides.eval.batch_size,
            "random_init_baseline": overrides.eval.random_init_baseline,
        }
    elif not isinstance(overrides, Mapping):
        import yaml

        flat: dict[str, Any] = {}
        for item in overrides:
            key, equals, raw = str(item).partition("=")
            if not equals:
                raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. knn_k=20")
            try:  # YAML scalars, as run overrides: 0.1 is a number, true a bool, null None
                flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                flat[key.strip()] = raw
        overrides = flat
    data = {}
    for key, value in overrides.items():
        name = _ALIASES.get(key, key.removeprefix("eval."))
        data[name] = value
    # config.build_section gives the same typed checks and "did you mean" hints as run configs.
    return config_lib.build_section(EvalSettings, data, "eval.")


def _parse_protocols(protocols: str | Sequence[str]) -> tuple[str, ...]:
    names = [protocols] if isinstance(protocols, str) else list(protocols)
    if "all" in names:
        return PROTOCOLS
    for name in names:
        if name not in PROTOCOLS:
            raise ConfigError(f"--protocol: got '{name}'; allowed: {', '.join(PROTOCOLS)}, all")
    if not names:
        raise ConfigError(f"--protocol: none given; allowed: {', '.join(PROTOCOLS)}, all")
    return tuple(dict.fromkeys(names))


def _load_labelled(dataset: str, root: str | None, split: str, max_bad_fraction: float):
    hint = (
        "evaluation needs a labelled dataset with train and test splits; pass e.g. "
        "data.dataset=imagefolder data.root=DIR (DIR/train/<class>/..., DIR/test/<class>/...) "
        "or data.dataset=mnist5k"
    )
    try:
        data = load_dataset(dataset, root, split, quiet=True, max_bad_fraction=max_bad_fraction)
    except ConfigError as error:
        raise ConfigError(f"{error} ({hint})") from None
    except ValueError:  # the dataset has no such split
        raise ConfigError(f"data.dataset: '{dataset}' has no {split} split; {hint}") from None
    if data.labels is None:
        raise ConfigError(f"data.dataset: '{dataset}' ({split} split) has no labels; {hint}")
    return data


def _top(result: dict[str, Any]) -> dict[str, float]:
    return {"top1": result["top1"], "top5": result["top5"]}


def _standardised(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


class _Subjects:
    """The networks compared ("pretrained", "random_init") and their cached features.

    Features are computed once and shared by the protocols that use them (L-BFGS, kNN,
    t-SNE); "raw_pixels" are the standardised, flattened test-transform images. The pretrained
    features come first: computing them finds the files that do not decode, and every protocol
    after runs on the splits without them. Under several processes (``info``) the networks'
    features are computed by all of them (``needs_twin``: the random-initialisation twin's
    too) when the subjects are built; everything after runs on the main process alone.
    """

    def __init__(self, model: SimCLR, arch: dict[str, Any], run_seed: int, train: Source,
                 test: Source, *, batch_size: int, device: torch.device,
                 max_bad_fraction: float, info: distributed.DistInfo | None = None,
                 needs_twin: bool = False) -> None:  # fmt: skip
        self.model, self.arch, self.run_seed = model, arch, run_seed
        self.info = info or distributed.DistInfo()
        self.feature_args = dict(image_size=arch["image_size"], batch_size=batch_size,
                                 device=device)  # fmt: skip
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        splits = []
        for split in (train, test):
            h, readable = evaluate.readable_features(
                model.encoder, split, max_bad_fraction=max_bad_fraction, info=self.info,
                **self.feature_args,
            )
            splits.append((h, readable))
        (train_h, self.train), (test_h, self.test) = splits
        self._features["pretrained"] = (train_h, test_h)
        self._twin: SimCLR | None = None
        if needs_twin and self.info.world_size > 1:
            self.features("random_init")

    def network(self, name: str) -> SimCLR:
        if name == "pretrained":
            return self.model
        if self._twin is None:
            # The exact weights the run started from (train.py seeds before building), with
            # BN statistics measured on the training split (not the placeholder 0 / 1): by the
            # main process, then handed to the others, so all of them hold the same twin.
            torch.manual_seed(self.run_seed)
            self._twin = build_model(self.arch).to(self.feature_args["device"]).eval()
            if self.info.is_main:
                evaluate.recalibrate_batchnorm(self._twin.encoder, self.train,
                                               **self.feature_args)  # fmt: skip
            if self.info.world_size > 1:
                buffers = {k: v.cpu() for k, v in self._twin.encoder.state_dict().items()}
                self._twin.encoder.load_state_dict(distributed.broadcast_object(buffers))
        return self._twin

    def features(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._features:
            splits = (self.train, self.test)
            if name == "raw_pixels":
                size = self.feature_args["image_size"]
                pixels = [evaluate.raw_pixel_features(s, image_size=size) for s in splits]
                self._features[name] = _standardised(*pixels)
            else:
                encoder = self.network(name).encoder
                computed = [evaluate.shared_features(encoder, s, self.info, **self.feature_args)
                            for s in splits]  # fmt: skip
                self._features[name] = tuple(c[0] if c else None for c in computed)
        return self._features[name]


def _run_protocol(
    protocol: str,
    subjects: _Subjects,
    settings: EvalSettings,
    *,
    num_classes: int,
    subset: np.ndarray | None,
    finetune_epochs: int,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Runs one protocol on every subject; returns its entry and the pretrained predictions."""
    train, test = subjects.train, subjects.test
    device = subjects.feature_args["device"]
    image_size = subjects.feature_args["image_size"]
    networks = ["pretrained"] + (["random_init"] if settings.random_init_baseline else [])
    frozen = networks + (["raw_pixels"] if settings.raw_pixels_baseline else [])

    def lbfgs(name: str) -> dict[str, Any]:
        train_h, test_h = subjects.features(name)
        return evaluate.logistic_regression_probe(
            train_h.numpy(), train.labels.numpy(), test_h.numpy(), test.labels.numpy(), seed=seed
        )

    def sgd(name: str) -> dict[str, Any]:
        return evaluate.linear_sgd_probe(
            subjects.network(name).encoder, train, test, image_size=image_size,
            num_classes=num_classes, epochs=settings.linear_epochs,
            batch_size=settings.linear_batch_size, base_lr=settings.linear_base_lr,
            augment=settings.linear_augment, seed=seed, device=device,
            feature_batch_size=settings.batch_size,
        )

    def knn(name: str) -> dict[str, Any]:
        train_h, test_h = subjects.features(name)
        return evaluate.knn_probe(
            train_h, train.labels, test_h, test.labels, k=settings.knn_k,
            temperature=settings.knn_temperature, num_classes=num_classes,
        )

    def finetune(name: str) -> dict[str, Any]:
        network = subjects.network(name)
        return finetune_lib.finetune(
            network.encoder, train, subset, test, image_size=image_size,
            num_classes=num_classes, epochs=finetune_epochs, head=network.head,
            proj_selector=settings.ft_proj_selector, batch_size=settings.finetune_batch_size,
            base_lr=settings.finetune_base_lr, protocol=settings.finetune_protocol, seed=seed,
            device=device,
            eval_batch_size=settings.batch_size,
        )

    if protocol == "linear":
        lbfgs_protocol = settings.linear_protocol == "lbfgs"
        runner, names = (lbfgs, frozen) if lbfgs_protocol else (sgd, networks)
    elif protocol == "knn":
        runner, names = knn, frozen
    else:
        runner, names = finetune, networks
    outcomes = {name: runner(name) for name in names}
    main = outcomes["pretrained"]
    predictions = main.pop("predictions")
    network = main.pop("network", None)  # fine-tuning's: the pretrained encoder's, kept
    for outcome in outcomes.values():
        outcome.pop("network", None)
    entry: dict[str, Any] = {"protocol": protocol, **_top(main)}
    entry.update({f"baseline_{name}": _top(outcomes[name]) for name in names[1:]})
    if protocol == "linear":
        entry["method"] = settings.linear_protocol
    entry.update({key: value for key, value in main.items() if key not in entry})
    return entry, predictions, network


def _save_finetuned(path: Path, network: torch.nn.Module, head: torch.nn.Module, trained: Any,
                    config: dict[str, Any], entry: dict[str, Any], dataset: str) -> None:  # fmt: skip
    """Writes the fine-tuned network as a checkpoint (``classifier.py``'s layout), atomically:
    what ``simclrkit distill`` takes as its teacher, and what evaluate, export and
    :func:`~simclrkit.export.load_classifier` read."""
    atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "architecture": trained.architecture,
            **network.cpu().state_parts(head),
            "config": config,
            "step": trained.info.get("step"),
            "finetune": {
                "dataset": dataset,
                **{key: entry[key] for key in ("label_fraction", "finetune_protocol", "top1",
                                               "top5", "num_labelled", "epochs", "lr")},
            },
        },
        path,
    )


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    *,
    protocols: str | Sequence[str] = PROTOCOLS,
    label_fraction: float = 0.1,
    overrides: Any = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Evaluates a trained network and writes the report (see the module docstring).

    Args:
        checkpoint_path: a training checkpoint (``RUN_DIR/checkpoints/last.pt``), a run
            folder, a fine-tuned or distilled network, a safetensors export or an imported TF
            model (the last two record no run: name ``data.dataset`` in ``overrides``).
            Fine-tuning writes its network to ``out_dir/finetuned_<P>pct_seed<S>.pt``.
        protocols: any of "linear", "knn", "finetune", or "all".
        label_fraction: fraction of the training labels fine-tuning may use (class-balanced).
        overrides: :class:`EvalSettings` keys as a mapping, ``KEY=VALUE`` strings, an
            ``EvalSettings`` or a run ``Config``; None: defaults on the checkpoint's dataset.
        out_dir: where to write; None: ``RUN_DIR/eval`` next to the ``checkpoints`` folder.
        device: "auto", "cpu", "cuda" or "cuda:N".
        seed: randomness of the evaluation (label subset, crops, held-out split, t-SNE). The
            random-initialisation twin uses the checkpoint's own seed: the weights it began from.
        quiet: no progress lines.

    Returns:
        One dict per protocol: ``protocol``, ``top1``, ``top5``, ``seconds``, the protocol's
        settings, and ``baseline_random_init`` / ``baseline_raw_pixels`` ({top1, top5}) when
        computed. ``seconds`` includes computing the features a protocol is first to need.
        Under torchrun (``WORLD_SIZE`` > 1) every process computes its share of the frozen
        features; the main process runs the protocols (fine-tuning and the SGD linear protocol
        on it alone), writes the report and returns the results, the others return [].

    Raises:
        ConfigError: unlabelled data or no test split, bad settings or protocol names.
        CheckpointError: the file is missing or unreadable, or its architecture, config or
            tensors are damaged (``export.read_trained``).
    """
    protocols = _parse_protocols(protocols)
    target = select_device(device)
    # Under torchrun (WORLD_SIZE > 1) every process computes its share of the features; the
    # main process runs the protocols and writes the report, the others return [].
    info = distributed.init_from_env(target.type)
    if info.world_size > 1 and target.type == "cuda":
        target = torch.device("cuda", info.local_rank)
    try:
        return _evaluate_checkpoint(
            checkpoint_path, protocols=protocols, label_fraction=label_fraction,
            overrides=overrides, out_dir=out_dir, device=target, seed=seed,
            quiet=quiet or not info.is_main, info=info,
        )
    finally:
        if info.initialized_here:
            distributed.shutdown()


def _evaluate_checkpoint(
    checkpoint_path: str | Path,
    *,
    protocols: tuple[str, ...],
    label_fraction: float,
    overrides: Any,
    out_dir: str | Path | None,
    device: torch.device,
    seed: int,
    quiet: bool,
    info: distributed.DistInfo,
) -> list[dict[str, Any]]:
    protocols = _parse_protocols(protocols)
    settings = eval_settings(overrides)
    if "finetune" in protocols:
        finetune_lib.class_balanced_subset([0], label_fraction)  # validates before any work
    checkpoint_path = Path(checkpoint_path)
    # Validated before any data is read: architecture, config and every tensor's shape, so a
    # damaged or forged file is one CheckpointError line, never a KeyError or a model the size
    # of the machine. Training checkpoints, fine-tuned and distilled networks, safetensors
    # exports and imported TF models are all read here (export.py).
    trained = read_trained(checkpoint_path)
    stored_config = trained.info.get("config") or {}
    if not stored_config and settings.dataset is None:
        raise ConfigError(
            f"{checkpoint_path} records no training run (an export or an imported model), so "
            "name the labelled data to evaluate on: data.dataset=NAME (and data.root=PATH)"
        )
    run_config = config_lib.from_dict(stored_config)
    if settings.ft_proj_selector is None:  # the recipe's choice (SimCLRv2: layer 1)
        settings = dataclasses.replace(settings, ft_proj_selector=run_config.eval.ft_proj_selector)
    arch = trained.architecture
    if "finetune" in protocols and trained.head_state is None and settings.ft_proj_selector:
        raise ConfigError(
            f"eval.ft_proj_selector={settings.ft_proj_selector}: {checkpoint_path} holds no "
            "projection head to fine-tune from; use eval.ft_proj_selector=0"
        )
    if settings.finetune_protocol == "auto":  # SimCLRv2's protocol for SimCLRv2's head
        v2_head = arch["head"] == "nonlinear" and arch["head_layers"] >= 3
        settings = dataclasses.replace(settings, finetune_protocol="v2" if v2_head else "v1")
    dataset = settings.dataset or run_config.data.dataset
    root = settings.root if settings.root or settings.dataset else run_config.data.root
    max_bad = settings.max_bad_fraction
    if max_bad is None:
        max_bad = run_config.data.max_bad_fraction
    train = _load_labelled(dataset, root, "train", max_bad)
    test = _load_labelled(dataset, root, "test", max_bad)
    if train.num_channels != arch["in_channels"]:
        raise ConfigError(
            f"data.dataset: '{dataset}' has {train.num_channels}-channel images, the encoder was "
            f"trained on {arch['in_channels']}-channel images; evaluate on a matching dataset"
        )
    num_classes = max(train.num_classes, int(max(train.labels.max(), test.labels.max())) + 1)
    if out_dir is None:
        parent = checkpoint_path.resolve().parent
        out_dir = (parent.parent if parent.name == "checkpoints" else parent) / "eval"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        if not quiet:
            print(f"simclrkit eval: {message}", file=sys.stderr, flush=True)

    model = build_model_from(trained)
    frozen = any(p in ("linear", "knn") for p in protocols) and settings.linear_protocol == "lbfgs"
    subjects = _Subjects(model.to(device).eval(), arch, run_config.seed, train, test,
                         batch_size=settings.batch_size, device=device, max_bad_fraction=max_bad,
                         info=info, needs_twin=settings.random_init_baseline and (
                             frozen or "knn" in protocols))  # fmt: skip
    train, test = subjects.train, subjects.test  # without the files that did not decode
    if not info.is_main:
        return []  # features shared; the protocols, plots and files are the main process's
    log(f"{checkpoint_path} (step {trained.info.get('step')}) on {dataset}: {len(train)} train / "
        f"{len(test)} test images, {num_classes} classes, {device}")

    results: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    subset = subset_file = None
    for protocol in protocols:
        started = time.perf_counter()
        if protocol == "finetune":
            subset = finetune_lib.class_balanced_subset(train.labels.numpy(), label_fraction, seed)
            subset_file = out_dir / f"label_subset_{label_fraction * 100:g}pct_seed{seed}.json"
            subset_file.write_text(json.dumps({
                "dataset": dataset, "split": "train", "label_fraction": label_fraction,
                "seed": seed, "num_labelled": len(subset), "indices": subset.tolist(),
            }))
        entry, predictions[protocol], network = _run_protocol(
            protocol, subjects, settings, num_classes=num_classes, subset=subset, seed=seed,
            finetune_epochs=settings.finetune_epochs
            or finetune_lib.finetune_epochs(label_fraction, device),
        )
        if protocol == "finetune":
            entry.update(label_fraction=label_fraction, subset_file=subset_file.name)
            saved = out_dir / f"finetuned_{label_fraction * 100:g}pct_seed{seed}.pt"
            _save_finetuned(saved, network, model.head, trained, stored_config, entry, dataset)
            entry["network_file"] = saved.name
        entry["seconds"] = time.perf_counter() - started
        results.append(entry)
        log(_summary_line(entry))

    plots = []
    if settings.tsne_points > 0:
        plots.append(plot_embedding(
            subjects.features("pretrained")[1], test.labels, out_dir / "embedding_tsne.png",
            max_points=settings.tsne_points, seed=seed, class_names=test.classes,
        ))
    if "linear" in predictions:
        plots.append(plot_confusion_matrix(
            test.labels.numpy(), predictions["linear"], out_dir / "confusion_matrix.png",
            num_classes=num_classes, class_names=test.classes,
        ))
    header = {
        "checkpoint": str(checkpoint_path),
        "step": trained.info.get("step"),
        "dataset": dataset,
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": num_classes,
        "image_size": arch["image_size"],
        "device": str(device),
        "seed": seed,
    }
    _write_report(out_dir, header, results, plots)
    log(f"wrote {out_dir / 'eval.md'}")
    return results


def _write_report(
    out_dir: Path, header: dict[str, Any], results: list[dict[str, Any]], plots: list[Path]
) -> None:
    (out_dir / "eval.json").write_text(json.dumps({**header, "results": results}, indent=2))
    lines = [
        f"# Evaluation of `{header['checkpoint']}` (step {header['step']}) on {header['dataset']}",
        "",
        f"{header['num_train']} training / {header['num_test']} test images, "
        f"{header['num_classes']} classes, {header['image_size']} px, {header['device']}. "
        "Accuracies in %; baselines: the same architecture at its initial weights (BN "
        "statistics measured on the training split) and raw pixels. Settings of each "
        "protocol are in eval.json.",
        "",
        format_results_table(results),
        "",
    ]
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    (out_dir / "eval.md").write_text("\n".join(lines) + "\n")


def _describe(entry: dict[str, Any]) -> str:
    if entry["protocol"] == "linear":
        if entry.get("method") == "sgd":
            return f"linear (SGD, {entry['epochs']} ep{'' if entry['augment'] else ', cached'})"
        return f"linear (L-BFGS, C={entry['C']:g})"
    if entry["protocol"] == "knn":
        return f"kNN (k={entry['k']}, t={entry['temperature']:g})"
    if entry["protocol"] == "finetune":
        how = {"v2": "v2, LARS", "v1": "v1, SGD"}.get(entry.get("finetune_protocol"), "")
        selector = entry.get("proj_selector")
        where = f", from head layer {selector}" if selector else ""
        return (f"fine-tune ({entry['label_fraction'] * 100:g}% labels, {entry['epochs']} ep"
                + (f", {how}" if how else "") + f"{where})")
    return str(entry["protocol"])


def _percent(value: dict[str, float] | None, key: str = "top1") -> str:
    return "-" if value is None else f"{100 * value[key]:.2f}"


def _summary_line(entry: dict[str, Any]) -> str:
    line = f"{_describe(entry)}: top-1 {_percent(entry)}%"
    for name in ("random_init", "raw_pixels"):
        if f"baseline_{name}" in entry:
            line += f", {name.replace('_', ' ')} {_percent(entry[f'baseline_{name}'])}%"
    return line + f" ({entry['seconds']:.1f}s)"


def format_results_table(results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`evaluate_checkpoint` results, accuracies in percent.

    Columns: protocol, top-1, top-5, random-init top-1 / top-5, raw-pixels top-1 / top-5,
    seconds; "-" where a baseline was not computed.
    """
    rows = [
        "| protocol | top-1 | top-5 | random init (top-1 / top-5) | raw pixels (top-1 / top-5) "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in results:
        baselines = []
        for name in ("random_init", "raw_pixels"):
            value = entry.get(f"baseline_{name}")
            baselines.append(
                "-" if value is None else f"{_percent(value)} / {_percent(value, 'top5')}"
            )
        rows.append(
            f"| {_describe(entry)} | {_percent(entry)} | {_percent(entry, 'top5')} | "
            f"{baselines[0]} | {baselines[1]} | {entry.get('seconds', float('nan')):.1f} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_embedding(
    features: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    *,
    max_points: int = 2000,
    seed: int = 0,
    class_names: Sequence[str] = (),
) -> Path:
    """A 2-D t-SNE map of features (N, D) coloured by class, written as a PNG.

    At most ``max_points`` points (a random subset) are embedded, after PCA to 50 dimensions
    (the usual t-SNE preprocessing, and it keeps the neighbour search cheap).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    generator = np.random.default_rng(seed)
    count = min(max_points, len(features))
    chosen = np.sort(generator.choice(len(features), size=count, replace=False))
    points = features[chosen].numpy().astype(np.float64)
    classes = labels[chosen].numpy()
    with evaluate.few_threads(points.size * 50):
        if points.shape[1] > 50 and count > 50:
            points = PCA(n_components=50, random_state=seed).fit_transform(points)
        perplexity = min(30.0, max(1.0, (count - 1) / 3))
        embedded = TSNE(n_components=2, init="pca", perplexity=perplexity,
                        random_state=seed).fit_transform(points)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    colours = plt.get_cmap("tab10" if classes.max() < 10 else "tab20")
    for label in np.unique(classes):
        mask = classes == label
        name = class_names[label] if label < len(class_names) else str(label)
        axes.scatter(embedded[mask, 0], embedded[mask, 1], s=4, color=colours(label % 20),
                     label=name)
    if len(np.unique(classes)) <= 20:
        axes.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    axes.set_title(f"t-SNE of test-set h ({count} images)")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def plot_confusion_matrix(
    labels: np.ndarray,
    predictions: np.ndarray,
    path: str | Path,
    *,
    num_classes: int,
    class_names: Sequence[str] = (),
) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), written as a PNG."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    plt = _pyplot()
    size = min(12.0, 3.0 + 0.4 * num_classes)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    axes.imshow(matrix, cmap="Blues")
    if num_classes <= 20:
        names = [class_names[i] if i < len(class_names) else str(i) for i in range(num_classes)]
        axes.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        axes.set_yticks(range(num_classes), names, fontsize=7)
        threshold = matrix.max() / 2
        for (row, column), count in np.ndenumerate(matrix):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=6,
                      color="white" if count > threshold else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axes.set_title(f"linear protocol, test split (top-1 {100 * accuracy:.2f}%)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
