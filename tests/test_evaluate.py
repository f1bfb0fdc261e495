"""Evaluation protocols: frozen encoders stay frozen, kNN and subsets match hand-computed
answers, and a briefly pretrained checkpoint
beats its random-initialisation twin under every protocol, with the report written."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from simclrkit import evaluate, runeval
from simclrkit import finetune as finetune_lib
from simclrkit.checkpoint import CheckpointError
from simclrkit.classifier import Classifier
from simclrkit.config import ConfigError, load_config
from simclrkit.data import BadImageWarning, load_dataset, mnist5k_split
from simclrkit.eval_report import (
    EvalSettings,
    eval_settings,
    evaluate_checkpoint,
    format_results_table,
)
from simclrkit.models import ProjectionHead, build_encoder
from simclrkit.optim import parameter_groups
from simclrkit.report import preview_augmentations
from simclrkit.train import pretrain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a 2-core CPU shared with other jobs, idle intra-op threads spin and made these tiny
    # convolutions ~20x slower (measured); one thread keeps the file within its budget.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Small labelled splits of MNIST-5k (sorted by class): 200 train, 100 test images."""
    train = load_dataset("mnist5k", None, "train", quiet=True)
    test = load_dataset("mnist5k", None, "test", quiet=True)

    def every(data, step):  # the splits are sorted by class: keep every class
        return dataclasses.replace(data, images=data.images[::step], labels=data.labels[::step])

    return every(train, 20), every(test, 10)


@pytest.fixture
def encoder(digits):
    """A tiny ResNet-18 with non-trivial BN statistics (measured on the digits)."""
    torch.manual_seed(0)
    model = build_encoder("resnet18", width=0.125, in_channels=1, image_size=16)
    evaluate.recalibrate_batchnorm(model, digits[0], image_size=16)
    return model


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


# --------------------------------------------------------------------------------------
# Frozen protocols do not touch the encoder
# --------------------------------------------------------------------------------------


def test_frozen_protocols_leave_weights_and_bn_buffers_bit_identical(encoder, digits):
    train, test = digits
    before = _snapshot(encoder)
    assert any(name.endswith("num_batches_tracked") for name in before)  # buffers are covered
    encoder.train()  # the protocols must switch to eval mode themselves, and switch back

    train_h = evaluate.extract_features(encoder, train, image_size=16)
    test_h = evaluate.extract_features(encoder, test, image_size=16)
    evaluate.logistic_regression_probe(
        train_h.numpy(), train.labels.numpy(), test_h.numpy(), test.labels.numpy()
    )
    evaluate.knn_probe(train_h, train.labels, test_h, test.labels, k=20)
    for augment in (True, False):
        evaluate.linear_sgd_probe(
            encoder, train, test, image_size=16, num_classes=10, epochs=1, batch_size=64,
            augment=augment,
        )
    finetune_lib.finetune(encoder, train, np.arange(40), test, image_size=16, num_classes=10,
                          epochs=1, batch_size=20)

    _assert_unchanged(encoder, before)
    assert encoder.training
    assert all(p.grad is None for p in encoder.parameters())

    # Control: the check above would have caught a forward pass in train mode.
    with torch.no_grad():
        encoder.forward_features(evaluate.eval_views(train, range(32), 16, train=False))
    with pytest.raises(AssertionError, match="running_mean|num_batches_tracked"):
        _assert_unchanged(encoder, before)


def test_finetune_network_reads_the_selected_projection_head_layer(encoder, digits):
    torch.manual_seed(1)
    head = ProjectionHead(encoder.feature_dim, num_layers=3, hidden_dim=24, out_dim=8).eval()
    network = Classifier(encoder, list(head.layers[:1]), 10).eval()
    assert network.classifier.in_features == 24
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        expected = network.classifier(head.forward_layers(encoder.forward_features(x))[1])
        torch.testing.assert_close(network(x), expected)
    with pytest.raises(ConfigError, match="ft_proj_selector: got 4; allowed: 0 to 3"):
        finetune_lib.finetune(encoder, digits[0], np.arange(10), digits[1], image_size=16,
                              num_classes=10, epochs=1, head=head, proj_selector=4)


# --------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------


def test_knn_weighted_vote_differs_from_majority_as_computed_by_hand():
    # One class-0 neighbour at similarity 1, two class-1 neighbours at similarity 0, and a
    # class-2 point at -1 that k = 3 leaves out. Majority: class 1. Weighted (t = 0.1):
    # class 0 gets e^10, class 1 gets 2 e^0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [-1.0, 0.0]])  # norms differ
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    votes = evaluate.knn_classify(train, labels, query, 3, 0.1, 3)
    total = math.exp(10) + 2
    expected = torch.tensor([[math.exp(10) / total, 2 / total, 0.0]])
    torch.testing.assert_close(votes, expected)
    assert votes.argmax().item() == 0
    # A high temperature flattens the weights to a majority vote: e^0.1 < 2.
    flat = evaluate.knn_classify(train, labels, query, k=3, temperature=10.0, num_classes=3)
    torch.testing.assert_close(
        flat, torch.tensor([[math.exp(0.1), 2.0, 0.0]]) / (math.exp(0.1) + 2)
    )
    assert flat.argmax().item() == 1
    # k = 1: only the nearest neighbour votes.
    nearest = evaluate.knn_classify(train, labels, query, k=1, temperature=0.1, num_classes=3)
    torch.testing.assert_close(nearest, torch.tensor([[1.0, 0.0, 0.0]]))


def test_knn_matches_a_naive_loop_and_is_independent_of_chunking():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 6, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    test = torch.randn(9, 6, generator=generator)
    k, temperature = 7, 0.5
    expected = torch.zeros(9, 4, dtype=torch.float64)
    for row, query in enumerate(test.double()):
        similarity = [
            float(query @ x.double() / (query.norm() * x.double().norm())) for x in train
        ]
        for index in np.argsort(similarity)[::-1][:k]:
            expected[row, labels[index]] += math.exp(similarity[index] / temperature)
        expected[row] /= expected[row].sum()
    for chunk_size in (None, 1, 4):
        votes = evaluate.knn_classify(train, labels, test, k, temperature, 4, chunk_size=chunk_size)
        torch.testing.assert_close(votes.double(), expected, rtol=1e-5, atol=1e-6)
    # A tiny temperature would overflow exp(s / t) without the max-subtraction.
    sharp = evaluate.knn_classify(train, labels, test, k, 0.001, 4)
    assert torch.isfinite(sharp).all()


# --------------------------------------------------------------------------------------
# Label subsets
# --------------------------------------------------------------------------------------


def test_class_balanced_subset_counts_round_half_up_and_keep_one_per_class():
    labels = np.repeat([0, 1, 2, 3], [50, 25, 7, 3])
    subset = finetune_lib.class_balanced_subset(labels, 0.1, seed=0)
    # 5; 2.5 -> 3 (half up; Python's round gives 2); 0.7 -> 1; 0.3 -> 0 -> at least 1.
    assert np.bincount(labels[subset]).tolist() == [5, 3, 1, 1]
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    assert finetune_lib.class_balanced_subset(labels, 1.0, seed=0).tolist() == list(range(85))
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="label_fraction"):
            finetune_lib.class_balanced_subset(labels, bad, seed=0)


def test_class_balanced_subset_of_mnist5k_refers_to_train_and_is_seeded():
    train_labels = load_dataset("mnist5k", None, "train", quiet=True).labels.numpy()
    all_labels = load_dataset("mnist5k", None, "all", quiet=True).labels.numpy()
    train_index, test_index = mnist5k_split(all_labels)
    subset = finetune_lib.class_balanced_subset(train_labels, 0.1, seed=3)
    counts = np.bincount(train_labels)
    assert np.bincount(train_labels[subset]).tolist() == [
        math.floor(0.1 * c + 0.5) for c in counts
    ]
    in_all = train_index[subset]  # positions in the 5,000 images
    assert not set(in_all) & set(test_index)
    assert np.array_equal(all_labels[in_all], train_labels[subset])
    assert np.array_equal(subset, finetune_lib.class_balanced_subset(train_labels, 0.1, seed=3))
    assert not np.array_equal(subset, finetune_lib.class_balanced_subset(train_labels, 0.1, seed=4))


# --------------------------------------------------------------------------------------
# A module trained beside the network gets its own parameter group
# --------------------------------------------------------------------------------------


def test_an_extra_module_gets_a_group_without_lars_and_weight_decay():
    backbone = torch.nn.Linear(8, 8)
    probe = torch.nn.Linear(8, 2)
    groups = parameter_groups(backbone, 1e-6, extra_excluded=(probe,))
    probe_group = next(g for g in groups if g["name"] == "probe")
    assert {id(p) for p in probe_group["params"]} == {id(p) for p in probe.parameters()}
    assert probe_group["lars"] is False and probe_group["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------
# Logistic regression and the table
# --------------------------------------------------------------------------------------


def test_logistic_regression_probe_separable_and_a_class_missing_from_train():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 5)) * 10
    train_y = np.repeat([0, 1, 2], 30)  # class 3 never seen in training
    test_y = np.array([0, 1, 2, 3])
    train_x = centres[train_y] + rng.normal(size=(90, 5))
    test_x = centres[test_y]
    result = evaluate.logistic_regression_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] == 0.75  # the unseen class cannot be predicted
    assert result["predictions"][:3].tolist() == [0, 1, 2]
    assert result["C"] in evaluate.C_GRID and result["converged"]
    # One example in a class: no held-out selection possible, still a fit.
    few = evaluate.logistic_regression_probe(train_x[:31], train_y[:31], test_x, test_y)
    assert few["validation_top1"] == {} and few["predictions"][0] == 0


def test_format_results_table_shows_every_number():
    results = [
        {"protocol": "linear", "method": "lbfgs", "C": 0.1, "top1": 0.91234, "top5": 0.995,
         "baseline_random_init": {"top1": 0.4321, "top5": 0.88},
         "baseline_raw_pixels": {"top1": 0.9, "top5": 0.99}, "seconds": 12.34},
        {"protocol": "finetune", "label_fraction": 0.01, "epochs": 30, "top1": 0.5,
         "top5": 0.9, "seconds": 3.0},
    ]
    table = format_results_table(results).splitlines()
    assert table[0].startswith("| protocol | top-1 | top-5 | random init")
    assert table[2] == (
        "| linear (L-BFGS, C=0.1) | 91.23 | 99.50 | 43.21 / 88.00 | 90.00 / 99.00 | 12.3 |"
    )
    assert table[3] == "| fine-tune (1% labels, 30 ep) | 50.00 | 90.00 | - | - | 3.0 |"


def test_eval_settings_from_strings_mappings_and_configs():
    settings = eval_settings(["knn_k=20", "eval.linear_protocol=sgd", "data.dataset=mnist5k"])
    assert (settings.knn_k, settings.linear_protocol, settings.dataset) == (20, "sgd", "mnist5k")
    assert eval_settings({"eval.finetune_epochs": 3}).finetune_epochs == 3
    config = load_config("mnist5k", ["eval.batch_size=64", "data.max_bad_fraction=0.05"])
    assert eval_settings(config) == EvalSettings(
        dataset="mnist5k", batch_size=64, max_bad_fraction=0.05
    )
    assert eval_settings(["data.max_bad_fraction=0.2"]).max_bad_fraction == 0.2
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        eval_settings({"data.max_bad_fraction": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'knn_k'"):
        eval_settings({"knn_kk": 3})
    with pytest.raises(ConfigError, match="linear_protocol"):
        eval_settings({"linear_protocol": "adam"})
    with pytest.raises(ConfigError, match="knn_temperature"):
        eval_settings({"knn_temperature": 0})


# --------------------------------------------------------------------------------------
# A real checkpoint, end to end
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """MNIST-5k, eighth-width ResNet-18 at 16 px, 60 steps of batch 256 (~10 s)."""
    run = tmp_path_factory.mktemp("pretrained")
    overrides = [
        "model.width=0.125",
        "data.image_size=16",
        "train.batch_size=256",
        "train.max_steps=60",
        "train.checkpoint_every=1000",
        "optim.warmup_epochs=0.2",
        "eval.linear=false",
    ]
    pretrain(load_config("mnist5k", overrides), run, quiet=True)
    return run


@pytest.fixture(scope="module")
def evaluated(run_dir):
    # Short fine-tuning with a larger learning rate than the paper's rule, so 5 epochs learn.
    overrides = {"finetune_epochs": 5, "finetune_batch_size": 32, "finetune_base_lr": 0.2,
                 "tsne_points": 300}
    return evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", protocols="all",
                               overrides=overrides, quiet=True)


def test_pretrained_beats_random_init_under_every_protocol(evaluated):
    by_name = {entry["protocol"]: entry for entry in evaluated}
    assert list(by_name) == ["linear", "knn", "finetune"]
    linear, knn, finetune = by_name["linear"], by_name["knn"], by_name["finetune"]
    # Measured: linear 0.78 vs 0.51, kNN 0.65 vs 0.43, fine-tuning 0.37 vs 0.23.
    assert linear["top1"] > linear["baseline_random_init"]["top1"] + 0.1
    assert knn["top1"] > knn["baseline_random_init"]["top1"] + 0.05
    assert finetune["top1"] > 0.25  # chance is 0.1
    assert finetune["top1"] > finetune["baseline_random_init"]["top1"] + 0.05
    assert "baseline_raw_pixels" not in finetune
    assert linear["baseline_raw_pixels"]["top1"] > 0.8  # pixels do well on digits
    for entry in evaluated:
        assert 0 <= entry["top1"] <= entry["top5"] <= 1 and entry["seconds"] > 0
    assert linear["method"] == "lbfgs" and linear["C"] in evaluate.C_GRID
    assert (knn["k"], knn["temperature"]) == (200, 0.1)
    assert finetune["epochs"] == 5 and finetune["label_fraction"] == 0.1
    assert finetune["num_labelled"] == 400


def test_report_files_hold_the_results(evaluated, run_dir):
    out = run_dir / "eval"  # the default: next to checkpoints/
    saved = json.loads((out / "eval.json").read_text())
    assert saved["results"] == json.loads(json.dumps(evaluated))
    assert saved["dataset"] == "mnist5k" and saved["num_test"] == 1000
    markdown = (out / "eval.md").read_text()
    assert format_results_table(evaluated) in markdown
    for entry in evaluated:
        assert f"| {100 * entry['top1']:.2f} | {100 * entry['top5']:.2f} |" in markdown
        assert f"{100 * entry['baseline_random_init']['top1']:.2f}" in markdown
    for name in ("embedding_tsne.png", "confusion_matrix.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert f"]({name})" in markdown
    subset = json.loads((out / evaluated[2]["subset_file"]).read_text())
    train_labels = load_dataset("mnist5k", None, "train", quiet=True).labels.numpy()
    assert subset["indices"] == finetune_lib.class_balanced_subset(train_labels, 0.1, 0).tolist()


def test_finetuned_network_is_saved_and_reloads_to_the_reported_accuracy(evaluated, run_dir,
                                                                        tmp_path):  # fmt: skip
    from simclrkit.export import export_checkpoint, load_classifier

    finetune = evaluated[2]
    saved = run_dir / "eval" / finetune["network_file"]
    assert saved.name == "finetuned_10pct_seed0.pt"
    test = load_dataset("mnist5k", None, "test", quiet=True)

    def accuracy(network):
        with torch.no_grad():
            logits = torch.cat([network(x) for _, x in evaluate._test_batches(test, 16, 500)])
        return evaluate.top_k_accuracies(logits, test.labels)[0]

    network = load_classifier(saved)
    assert network.proj_selector == 0 and network.num_classes == 10
    assert accuracy(network) == finetune["top1"]  # the very network that was scored
    # The same network through a safetensors export.
    export_checkpoint(saved, "safetensors", tmp_path / "ft.safetensors")
    assert accuracy(load_classifier(tmp_path / "ft.safetensors")) == finetune["top1"]
    with pytest.raises(CheckpointError, match="without a classifier; fine-tune it first"):
        load_classifier(run_dir / "checkpoints" / "last.pt")


def test_sgd_linear_protocol_on_cached_features(run_dir, tmp_path):
    results = evaluate_checkpoint(
        run_dir / "checkpoints" / "last.pt", protocols=["linear"], out_dir=tmp_path, quiet=True,
        overrides={"linear_protocol": "sgd", "linear_augment": False, "linear_epochs": 10,
                   "tsne_points": 0},
    )
    (linear,) = results
    assert linear["method"] == "sgd" and linear["epochs"] == 10 and not linear["augment"]
    assert linear["steps"] == 10 * math.ceil(4000 / 256)
    assert linear["top1"] > linear["baseline_random_init"]["top1"] + 0.1
    assert "baseline_raw_pixels" not in linear
    assert (tmp_path / "confusion_matrix.png").exists()
    assert not (tmp_path / "embedding_tsne.png").exists()


def _trained(run_dir):
    from simclrkit.checkpoint import load_checkpoint
    from simclrkit.config import from_dict
    from simclrkit.models import build_model

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(state["architecture"])
    model.encoder.load_state_dict(state["encoder"])
    config = from_dict(state["config"])

    def random_encoder():
        torch.manual_seed(config.seed)
        return build_model(state["architecture"]).encoder

    return model, random_encoder, config


def test_end_of_run_evaluation_keeps_its_contract(run_dir):
    model, random_encoder, config = _trained(run_dir)
    report = runeval.evaluate_run(model.encoder, random_encoder, config, image_size=16,
                                  train_seconds=10.0, quiet=True)
    assert report["linear_top1"] > report["random_init_linear_top1"] + 0.1
    assert report["knn_top1"] > report["random_init_knn_top1"]
    assert {"linear_top5", "linear_C", "random_init_linear_top5", "eval_seconds"} <= set(report)
    # MNIST-5k is under the default caps: the whole 4,000 / 1,000 split, nothing cut.
    assert (report["eval_train_images"], report["eval_test_images"]) == (4000, 1000)
    assert report["eval_notes"] == [] and report["eval_budget_seconds"] == 60.0


def test_end_of_run_evaluation_shrinks_to_its_budget(run_dir):
    model, random_encoder, config = _trained(run_dir)
    capped = dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, max_train_images=1000, max_test_images=300))
    report = runeval.evaluate_run(model.encoder, None, capped, image_size=16,
                                  train_seconds=10.0, quiet=True)
    assert (report["eval_train_images"], report["eval_test_images"]) == (1000, 300)
    # A budget far below the cost of the features: the subsample shrinks, class-balanced, and
    # the evaluation keeps to the budget. "Far below" is measured on this host: a quarter of
    # what the whole evaluation took (a fixed budget in seconds shrank nothing on fast hosts).
    unbounded = dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, min_seconds=0.0, max_share=1.0))
    whole = runeval.evaluate_run(model.encoder, random_encoder, unbounded, image_size=16,
                                 train_seconds=1e6, quiet=True)
    assert (whole["eval_train_images"], whole["eval_notes"]) == (4000, [])
    tight = dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, min_seconds=0.0, max_share=whole["eval_seconds"] / 4 / 60.0))
    measured = []
    for _ in range(2):
        report = runeval.evaluate_run(model.encoder, random_encoder, tight, image_size=16,
                                      train_seconds=60.0, quiet=True)
        measured.append(report)
    report = measured[-1]
    assert report and report["eval_train_images"] < 4000
    assert any("shrunk" in note or "dropped" in note for note in report["eval_notes"])
    assert report["eval_seconds"] <= 1.2 * report["eval_budget_seconds"] + 0.5


def test_balanced_order_is_round_robin_over_classes_and_seeded():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    order = runeval.balanced_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(10))
    assert labels[order[:3]].tolist() == [0, 1, 2]  # one of each class first
    assert sorted(labels[order[3:5]].tolist()) == [0, 1]  # then the classes that have more
    assert labels[order[-3:]].tolist() == [0, 0, 0]
    assert np.array_equal(order, runeval.balanced_order(labels, seed=0))
    assert not np.array_equal(order, runeval.balanced_order(labels, seed=1))


def test_logistic_regression_deadline_cuts_iterations_then_the_grid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    free = evaluate.logistic_regression_probe(x, y, x, y)
    assert free["notes"] == [] and len(free["validation_top1"]) == len(evaluate.C_GRID)
    import time

    rushed = evaluate.logistic_regression_probe(x, y, x, y, deadline=time.perf_counter())
    assert rushed["validation_top1"] == {} and rushed["C"] == 1.0
    assert any("grid skipped" in n for n in rushed["notes"])
    assert any("capped at 10 iterations" in n for n in rushed["notes"])
    assert rushed["top1"] > 0.9  # separable: a few iterations suffice


def test_unlabelled_or_untestable_datasets_raise_config_errors(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "last.pt"
    images = tmp_path / "images"
    (images / "train" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), color=i * 80).save(images / "train" / "a" / f"{i}.png")

    with pytest.raises(ConfigError, match="no labels.*data.dataset=imagefolder"):
        evaluate_checkpoint(checkpoint, overrides={"data.dataset": "folder",
                                                   "data.root": str(images)}, quiet=True)
    with pytest.raises(ConfigError, match="no test/.*data.dataset="):
        evaluate_checkpoint(checkpoint, overrides={"data.dataset": "imagefolder",
                                                   "data.root": str(images)}, quiet=True)
    with pytest.raises(ConfigError, match="--protocol: got 'svm'"):
        evaluate_checkpoint(checkpoint, protocols=["svm"], quiet=True)
    with pytest.raises(ConfigError, match="label_fraction"):
        evaluate_checkpoint(checkpoint, label_fraction=2.0, quiet=True)


def test_evaluation_keeps_the_runs_tolerance_for_bad_files(tmp_path):
    # A labelled folder with one undecodable file in 13 (7.7%): over the 1% default, under the
    # 10% the run was given. Evaluating that run must not refuse the folder it trained on.
    root = tmp_path / "images"
    for split, count in (("train", 6), ("test", 3)):
        for label, shade in (("dark", 40), ("light", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (12, 12), color=shade + 5 * i).save(
                    root / split / label / f"{i}.png"
                )
    (root / "train" / "dark" / "broken.png").write_bytes(b"not a png at all")
    run = tmp_path / "run"
    overrides = ["model.width=0.125", "data.image_size=8", "train.batch_size=4",
                 "train.max_steps=2", "eval.random_init_baseline=false",
                 "data.dataset=imagefolder", f"data.root={root}", "data.max_bad_fraction=0.1"]
    config = load_config("mnist5k", overrides)
    with pytest.warns(BadImageWarning, match="broken.png"):  # found by training or evaluation
        summary = pretrain(config, run, quiet=True)
    assert summary["eval"]["linear_top1"] == 1.0  # the end-of-run evaluation was not skipped
    assert summary["eval"]["eval_train_images"] == 12  # the broken file left out
    with pytest.warns(BadImageWarning, match="broken.png"):  # every image asked for: 12 shown
        grid = preview_augmentations(config, tmp_path / "views.png", num_images=13, num_views=2)
    assert grid.read_bytes().startswith(PNG_MAGIC)
    checkpoint = run / "checkpoints" / "last.pt"
    settings = {"tsne_points": 0, "random_init_baseline": False, "raw_pixels_baseline": False}

    with pytest.warns(BadImageWarning, match="broken.png"):
        (linear,) = evaluate_checkpoint(checkpoint, protocols=["linear"], overrides=settings,
                                        out_dir=tmp_path / "eval", quiet=True)
    assert linear["top1"] == 1.0  # dark and light: separable by any encoder
    # The evaluation's own setting still wins over the run's.
    with pytest.warns(BadImageWarning), pytest.raises(ConfigError, match="data.max_bad_fraction"):
        evaluate_checkpoint(checkpoint, protocols=["linear"], quiet=True,
                            overrides={**settings, "data.max_bad_fraction": 0.01})


def test_v2_fine_tuning_is_lars_with_square_root_scaling_and_a_free_classifier(
    encoder, digits, monkeypatch
):
    built = {}
    real = finetune_lib.build_optimizer

    def spy(name, groups, **kwargs):
        built.update(name=name, groups=groups, **kwargs)
        return real(name, groups, **kwargs)

    monkeypatch.setattr(finetune_lib, "build_optimizer", spy)
    head = ProjectionHead(encoder.feature_dim, num_layers=3, hidden_dim=24, out_dim=8)
    result = finetune_lib.finetune(encoder, digits[0], np.arange(0, 200, 5), digits[1],
                                   image_size=16, num_classes=10, epochs=1, head=head,
                                   proj_selector=1, batch_size=16, protocol="v2")  # fmt: skip
    # the reference README's SimCLRv2 fine-tuning: --optimizer=lars --learning_rate=0.005
    # --learning_rate_scaling=sqrt --weight_decay=0
    assert built["name"] == "lars" and built["weight_decay"] == 0.0 and built["momentum"] == 0.9
    assert result["lr"] == pytest.approx(0.005 * 16**0.5)
    assert result["finetune_protocol"] == "v2"
    groups = {group["name"]: group for group in built["groups"]}
    assert groups["weights"]["lars"] and not groups["norm_and_bias"]["lars"]
    assert not groups["probe"]["lars"]  # the classifier, as the reference's head_supervised
    assert len(groups["probe"]["params"]) == 2  # its weight and bias
    v1 = finetune_lib.finetune(encoder, digits[0], np.arange(0, 200, 5), digits[1],
                               image_size=16, num_classes=10, epochs=1, batch_size=16)  # fmt: skip
    assert v1["finetune_protocol"] == "v1" and v1["lr"] == pytest.approx(0.05 * 16 / 256)
    with pytest.raises(ConfigError, match="finetune_protocol"):
        finetune_lib.finetune(encoder, digits[0], np.arange(10), digits[1], image_size=16,
                              num_classes=10, epochs=1, protocol="v3")  # fmt: skip


def test_auto_picks_the_v2_protocol_for_a_three_layer_head(tmp_path, run_dir):
    from simclrkit.train import pretrain

    config = load_config("mnist5k", ["model.width=0.125", "data.image_size=16",
                                     "model.head_layers=3", "eval.ft_proj_selector=1",
                                     "train.max_steps=2", "eval.linear=false",
                                     "eval.monitor_every=0"])  # fmt: skip
    pretrain(config, tmp_path / "v2", quiet=True)
    settings = {"finetune_epochs": 1, "tsne_points": 0, "random_init_baseline": False}
    for run, expected in ((tmp_path / "v2", "v2"), (run_dir, "v1")):
        (result,) = evaluate_checkpoint(run / "checkpoints" / "last.pt", protocols="finetune",
                                        overrides=settings, out_dir=tmp_path / f"eval-{expected}",
                                        quiet=True)  # fmt: skip
        assert result["protocol"] == "finetune" and result["finetune_protocol"] == expected
    (forced,) = evaluate_checkpoint(tmp_path / "v2" / "checkpoints" / "last.pt",
                                    protocols="finetune",
                                    overrides={**settings, "finetune_protocol": "v1"},
                                    out_dir=tmp_path / "eval-forced", quiet=True)  # fmt: skip
    assert forced["finetune_protocol"] == "v1"
