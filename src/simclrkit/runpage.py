"""The run page: ``report.html``, one self-contained file that shows what a run learned.

It holds, all inline (images as ``data:`` URIs, CSS in the page, no script, no network):

* the run's facts and its training curves (the ``plots/*.png`` that ``report.py`` draws:
  loss, learning rate, contrastive accuracy, throughput, and the monitors' accuracy, alignment,
  uniformity and effective rank where they ran);
* the augmentation preview (``report.augmentation_grid``: the views pretraining draws);
* a gallery: query images and their nearest training images by cosine similarity of h, a
  neighbour of the query's class marked where the images have labels;
* a 2-D map of h (UMAP where ``umap-learn`` is installed, t-SNE otherwise) drawn with
  thumbnails, coloured by class where there are labels;
* the evaluation tables (the end-of-run evaluation, and ``eval/eval.json`` when
  ``simclrkit evaluate`` wrote one).

Unlabelled folders get the same page without the class marks. The page stays small because
every picture is a thumbnail (at most :data:`THUMBNAIL` px a side) or one plot: about 0.5 MB
for MNIST-5k.

Cost: h of at most ``max_images`` training images (500 by default: a fixed, class-balanced
choice; a second on a CPU for 28 px digits, about half a minute for 224 px photos on a CPU, a
few seconds on a GPU) and one t-SNE of them (a few seconds); independent of the dataset's size,
so an ImageNet run's page costs what a small one's does. Pretraining writes it after
``report.md``; ``simclrkit report RUN`` rebuilds both.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simclrkit.checkpoint import atomic_write

THUMBNAIL = 64  # px, the longer side of every thumbnail in the page
_PLOTS = (
    ("monitors.png", "Accuracy, alignment, uniformity and effective rank while training"),
    ("loss.png", "NT-Xent loss"),
    ("lr.png", "Learning rate"),
    ("contrastive_acc.png", "Contrastive accuracy (the positive ranked first)"),
    ("throughput.png", "Throughput (images/s)"),
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img.plot { max-width: 100%; }
.plots { display: flex; flex-wrap: wrap; gap: 0 2%; }
.plots .wide { width: 100%; } .plots .half { width: 48%; }
.row { display: flex; align-items: center; gap: 6px; margin: 6px 0; }
.row img { width: 56px; height: 56px; object-fit: contain; image-rendering: pixelated;
           border: 3px solid #ddd; background: #fff; }
.row .query { border-color: #333; }
.row img.same { border-color: #2a9d3a; } .row img.other { border-color: #d33; }
.cell { display: flex; flex-direction: column; align-items: center; font-size: 0.7em; }
.note { color: #555; font-size: 0.9em; }
"""


def write_run_page(run_dir: str | Path, *, device: str | torch.device = "cpu",
                   max_images: int = 500, queries: int = 8, neighbours: int = 8) -> Path:  # fmt: skip
    """Writes ``run_dir/report.html`` (module docstring); returns its path.

    Args:
        run_dir: a run folder with ``config.yaml``, ``metrics.jsonl`` and a checkpoint.
        device: where h is computed.
        max_images: training images embedded for the gallery and the map.
        queries, neighbours: gallery rows and the neighbours shown for each.

    Raises:
        ConfigError / CheckpointError: the folder is not a run, or its data is not readable.
    """
    from simclrkit.config import ConfigError, load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (it has no config.yaml)")
    config = load_config(str(run_dir / "config.yaml"))
    summary = _read_json(run_dir / "summary.json")
    sections = [_facts(run_dir, summary)]
    plots = [(name, caption) for name, caption in _PLOTS if (run_dir / "plots" / name).is_file()]
    if plots:
        sections.append('<h2>Training curves</h2><div class="plots">' + "".join(
            f'<figure class="{"wide" if name == "monitors.png" else "half"}">'
            f'<img class="plot" alt="{html.escape(caption)}" '
            f'src="{_data_uri((run_dir / "plots" / name).read_bytes(), "png")}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for name, caption in plots
        ) + "</div>")  # fmt: skip
    sections.append(_augmentations(config))
    if (run_dir / "checkpoints" / "last.pt").is_file():
        sections.append(_learned(run_dir, config, device, max_images, queries, neighbours))
    sections.append(_evaluation(summary, _read_json(run_dir / "eval" / "eval.json")))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>simclrkit run {html.escape(run_dir.name)}</title><style>{_STYLE}</style>"
        f"</head><body><h1>simclrkit run: {html.escape(run_dir.name)}</h1>"
        + "".join(sections)
        + f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M:%S")} by simclrkit; rebuild '
        f"with <code>simclrkit report {html.escape(str(run_dir))}</code>.</p></body></html>\n"
    )
    out = run_dir / "report.html"
    atomic_write(out, lambda handle: handle.write(page.encode("utf-8")))
    return out


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _facts(run_dir: Path, summary: dict[str, Any]) -> str:
    if not summary:
        return '<p class="note">The run has not finished: no summary.json yet.</p>'
    data = summary.get("data", {})
    facts = [
        f"{summary.get('steps')} steps ({_number(summary.get('epochs'), '.1f')} epochs), final "
        f"loss {_number(summary.get('final_loss'), '.4f')}",
        f"{_number(summary.get('train_seconds'), '.0f')} s of training at "
        f"{_number(summary.get('images_per_second'), '.0f')} images/s",
    ]
    if data:
        facts.append(f"data: {data.get('name')} ({data.get('split')}), {data.get('size')} images")
    return "<ul>" + "".join(f"<li>{html.escape(str(fact))}</li>" for fact in facts) + "</ul>"


def _augmentations(config: Any) -> str:
    from simclrkit.report import preview_augmentations

    with tempfile.TemporaryDirectory() as folder:
        grid = preview_augmentations(config, Path(folder) / "views.png", num_images=4, num_views=6)
        uri = _data_uri(grid.read_bytes(), "png")
    return (
        "<h2>Augmentation preview</h2><figure>"
        f'<img class="plot" alt="source images and their views" src="{uri}">'
        "<figcaption>Source images (left) and views pretraining draws for them.</figcaption>"
        "</figure>"
    )


def _learned(run_dir: Path, config: Any, device: str | torch.device, max_images: int,
             queries: int, neighbours: int) -> str:  # fmt: skip
    """The gallery and the map, from h of a fixed choice of training images."""
    from simclrkit.data import load_run_data
    from simclrkit.evaluate import compute_features, select_images
    from simclrkit.export import load_encoder
    from simclrkit.pipeline import epoch_order
    from simclrkit.runeval import balanced_order

    encoder = load_encoder(run_dir, device=device)
    source = load_run_data(config, "pretrain")
    labels = None if source.labels is None else source.labels.numpy()
    order = (balanced_order(labels, config.seed) if labels is not None
             else epoch_order(config.seed, 0, len(source)).numpy())  # fmt: skip
    part = select_images(source, np.asarray(order[:max_images]))
    h, kept, _ = compute_features(encoder, part, image_size=encoder.preprocess.image_size,
                                  batch_size=256, device=device, skip_bad=True)  # fmt: skip
    kept = kept.numpy()
    if len(kept) < 2:
        return '<h2>Nearest neighbours</h2><p class="note">Too few images decoded.</p>'
    z = F.normalize(h.float(), dim=1)
    similarity = z @ z.T
    part_labels = None if labels is None else part.labels.numpy()[kept]
    thumbs = [_thumbnail(part.read(int(i))) for i in kept]
    return _gallery(similarity, thumbs, part_labels, part, queries, neighbours) + _map(
        z.numpy(), thumbs, part_labels, config.seed, getattr(part, "classes", ()))


def _gallery(similarity: torch.Tensor, thumbs: list[str], labels: np.ndarray | None,
             part: Any, queries: int, neighbours: int) -> str:  # fmt: skip
    count = min(neighbours, len(thumbs) - 1)
    rows = []
    for query in range(min(queries, len(thumbs))):
        scores = similarity[query].clone()
        scores[query] = -float("inf")  # not its own neighbour
        top = torch.topk(scores, count)
        cells = [f'<div class="cell"><img class="query" alt="query {query}" '
                 f'src="{thumbs[query]}">query</div>']  # fmt: skip
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            mark = "" if labels is None else (
                ' class="same"' if labels[index] == labels[query] else ' class="other"')
            cells.append(f'<div class="cell"><img{mark} alt="neighbour" src="{thumbs[index]}">'
                         f"{value:.3f}</div>")  # fmt: skip
        rows.append('<div class="row">' + "".join(cells) + "</div>")
    legend = ("" if labels is None else
              " Green: a neighbour of the query's class; red: of another class.")  # fmt: skip
    return (
        "<h2>Nearest neighbours</h2>"
        f'<p class="note">Query images from the training set (left) and their {count} nearest '
        f"training images among {len(thumbs)} by cosine similarity of h (shown under each).{legend}"
        "</p>" + "".join(rows)
    )


def _map(z: np.ndarray, thumbs: list[str], labels: np.ndarray | None, seed: int,
         classes: tuple[str, ...]) -> str:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from PIL import Image

    if importlib.util.find_spec("umap") is not None:
        import umap

        points, method = umap.UMAP(random_state=seed).fit_transform(z), "UMAP"
    else:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (len(z) - 1) / 3))
        points = TSNE(init="pca", perplexity=perplexity, random_state=seed).fit_transform(z)
        method = "t-SNE"
    figure, axis = plt.subplots(figsize=(9, 9), dpi=90)
    colours = None if labels is None else plt.get_cmap("tab10")(labels % 10)
    axis.scatter(points[:, 0], points[:, 1], s=6, c=colours if colours is not None else "#888")
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(points))[:150]:  # thumbnails of a sample, over the dots
        picture = Image.open(io.BytesIO(base64.b64decode(thumbs[index].split(",", 1)[1])))
        image = OffsetImage(np.asarray(picture.convert("RGB")), zoom=0.5)
        frame = "#888" if colours is None else colours[index]
        axis.add_artist(AnnotationBbox(image, points[index], frameon=True, pad=0.1,
                                       bboxprops={"edgecolor": frame, "linewidth": 1.5}))
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(f"{method} of h, {len(points)} training images")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    legend = ""
    if labels is not None and classes:
        legend = " Colours are classes: " + ", ".join(
            f"{html.escape(str(name))} ({_TAB10[i % 10]})" for i, name in enumerate(classes))
    return (
        f"<h2>Map of h ({method})</h2><figure>"
        f'<img class="plot" alt="{method} map" src="{_data_uri(buffer.getvalue(), "png")}">'
        f"<figcaption>{method} of h with thumbnails of a sample of the images.{legend}"
        "</figcaption></figure>"
    )


_TAB10 = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")


def _evaluation(summary: dict[str, Any], separate: dict[str, Any]) -> str:
    evaluation = summary.get("eval") or {}
    parts = []
    rows = [
        (title, evaluation.get(f"{key}_top1"), evaluation.get(f"{key}_top5"))
        for key, title in (("linear", "linear (logistic regression on frozen h)"),
                           ("random_init_linear", "linear, same encoder at random initialisation"),
                           ("raw_pixels_linear", "linear on raw pixels"),
                           ("knn", "kNN on frozen h"),
                           ("random_init_knn", "kNN, same encoder at random initialisation"),
                           ("raw_pixels_knn", "kNN on raw pixels"))  # fmt: skip
        if isinstance(evaluation.get(f"{key}_top1"), (int, float))
    ]
    if rows:
        parts.append(_table(("protocol", "top-1", "top-5"), rows))
    for entry in separate.get("results", []):
        if not isinstance(entry, dict) or "protocol" not in entry:
            continue
        title = entry["protocol"]
        if entry["protocol"] == "finetune":
            title = (f"fine-tune ({100 * entry.get('label_fraction', 0):g}% labels, "
                     f"{entry.get('finetune_protocol', '')})")  # fmt: skip
        parts.append(_table(("simclrkit evaluate", "top-1", "top-5"),
                            [(title, entry.get("top1"), entry.get("top5"))]))  # fmt: skip
    if not parts:
        return '<h2>Evaluation</h2><p class="note">No evaluation with labels in this run.</p>'
    return "<h2>Evaluation</h2>" + "".join(parts)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_number(v, '.4f') if i else str(v))}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _thumbnail(image: torch.Tensor) -> str:
    """A (C, H, W) uint8 image as a PNG data URI at most :data:`THUMBNAIL` px a side."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue(), "png")


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
