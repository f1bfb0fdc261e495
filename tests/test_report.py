"""Report: metrics reading after resumes and crashes, plots, the augmentation preview."""

import json

from PIL import Image

from simclrkit.cli import main
from simclrkit.report import read_metrics, write_report


def test_read_metrics_keeps_the_resumed_record_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"event": "start", "step": 0},
        {"step": 1, "loss": 5.0, "lr": 0.1},
        {"step": 2, "loss": 4.0, "lr": 0.2},  # written after the last checkpoint, then killed
        {"event": "resume", "step": 1},
        {"step": 2, "loss": 3.5, "lr": 0.2},
        {"step": 3, "loss": 3.0, "lr": 0.3},
    ]
    path.write_text("\n".join(json.dumps(l) for l in lines) + '\n{"step": 4, "lo')
    records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 3.5), (3, 3.0)]


def test_write_report_makes_plots_and_tables(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps({"step": s, "loss": 6 - s * 0.1, "lr": 0.1 * s, "contrastive_acc": 0.1 * s,
                        "images_per_second": 100.0})
            for s in range(1, 6)
        )
        + '\n{"event": "resume", "step": 3}\n'
    )
    (tmp_path / "summary.json").write_text(json.dumps({
        "steps": 5, "epochs": 1.0, "final_loss": 5.5, "train_seconds": 3.0,
        "images_per_second": 100.0, "eval": {"linear_top1": 0.91, "linear_top5": 0.99,
                                             "random_init_linear_top1": 0.43, "knn_top1": 0.87,
                                             "eval_train_images": 500, "eval_test_images": 100,
                                             "eval_seconds": 4.0, "eval_budget_seconds": 60.0,
                                             "eval_notes": ["subsample shrunk to 50%"]},
        "data": {"name": "folder", "split": "train", "size": 40, "skipped": 0, "reads": 48,
                 "bad_reads": 2, "bad_files": 1,
                 "bad_files_named": [{"path": "/data/x.jpg", "reason": "truncated"}]},
    }))
    report = write_report(tmp_path).read_text()
    assert "0.9100" in report and "0.4300" in report and "resumed at step(s): 3" in report
    assert "| kNN (k=200) on frozen h | 0.8700 |" in report
    assert "subsample of 500 training and 100 test images" in report and "shrunk to 50%" in report
    assert "48, of which 2 failed and were replaced; 1 distinct bad files" in report
    assert "/data/x.jpg: truncated" in report
    for name in ("loss", "lr", "contrastive_acc", "throughput"):
        assert f"plots/{name}.png" in report
        assert Image.open(tmp_path / "plots" / f"{name}.png").size[0] > 100


def test_show_augmentations_writes_the_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["show-augmentations", "--out", str(out), "--images", "3", "--views", "4"]) == 0
    width, height = Image.open(out).size
    assert width > height  # 5 columns (original + 4 views) by 3 rows
    assert "3 images x 4 views" in capsys.readouterr().out
