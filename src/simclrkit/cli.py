"""Command line: subcommands -> validated config -> train/evaluate. No logic of its own.

Exit codes: 0 success; 1 an unexpected internal error (a bug: it keeps its traceback); 2 a
user error (bad config, missing or damaged data or checkpoint, a run folder in use, a full or
read-only disk, more memory than the machine has), printed as one line without a traceback
(``errors.py``); 3 the loss, gradients or weights stopped being finite; 143 stopped by
SIGTERM/SIGINT after writing a checkpoint (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from simclrkit.errors import EXIT_USER_ERROR, UserError, describe

EXIT_NONFINITE = 3


def _add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"a recipe name (see `simclrkit recipes`) or a YAML file (default: {default_config})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.epochs=20 loss.temperature=0.2",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclrkit",
        description="SimCLR pretraining and evaluation (Chen et al. 2020; SimCLRv2).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="pretrain an encoder, then evaluate it")
    _add_config_arguments(pretrain, "mnist5k")
    pretrain.add_argument("--run-dir", default="runs/latest", help="output folder")
    pretrain.add_argument("--quiet", action="store_true", help="no progress output")
    pretrain.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    pretrain.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's",
    )

    distill = sub.add_parser(
        "distill",
        help="distil a fine-tuned teacher into a student on unlabelled images (SimCLRv2)",
    )
    _add_config_arguments(distill, "mnist5k_distill")
    distill.add_argument("--teacher", default=None,
                         help="the fine-tuned network (sets distill.teacher)")
    distill.add_argument("--run-dir", default="runs/distill", help="output folder")
    distill.add_argument("--quiet", action="store_true", help="no progress output")
    distill.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    distill.add_argument(
        "--force", action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's",
    )

    importtf = sub.add_parser(
        "import-tf",
        help="convert a published SimCLR TensorFlow checkpoint (v1/v2, TF1 or TF2) to a simclrkit file",
    )
    importtf.add_argument(
        "checkpoint",
        help="a TF1 checkpoint (model.ckpt-N, or its folder) or a TF2 SavedModel folder",
    )
    importtf.add_argument(
        "--out", required=True,
        help=".safetensors (the export layout) or .pt (the checkpoint layout)",
    )
    importtf.add_argument(
        "--ft-proj-selector", type=int, default=None,
        help="the projection-head output the supervised head reads (0: h; 1: head layer 1, as "
        "SimCLRv2's fine-tuned releases); default: read from the saved graph",
    )
    importtf.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    report = sub.add_parser(
        "report", help="rebuild a run's report.md and report.html (curves, neighbours, a map of h)"
    )
    report.add_argument("run_dir", help="the run folder")
    report.add_argument("--device", default="auto")

    sub.add_parser("recipes", help="list the bundled recipes")

    index = sub.add_parser(
        "index", help="list image files (or shards) into an index file; no image is opened"
    )
    index.add_argument("root", help="the folder (for filelist: the list file)")
    index.add_argument("--out", required=True, help="the index file to write (.npz)")
    index.add_argument(
        "--dataset", default="folder", choices=("folder", "imagefolder", "filelist", "shards")
    )
    index.add_argument("--split", default="train", choices=("train", "test"))

    pack = sub.add_parser(
        "pack", help="write image files as tar shards, re-encoded at a maximum side"
    )
    pack.add_argument("root", help="the folder (for filelist: the list file)")
    pack.add_argument("--out", required=True, help="the shard folder to write")
    pack.add_argument("--dataset", default="folder", choices=("folder", "imagefolder", "filelist"))
    pack.add_argument("--max-side", type=int, default=320, help="longer side in pixels (0: keep)")
    pack.add_argument("--quality", type=int, default=90, help="JPEG quality")
    pack.add_argument("--shard-samples", type=int, default=5000, help="images per shard")
    pack.add_argument("--workers", type=int, default=None, help="encoding processes")
    pack.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint's frozen or fine-tuned encoder")
    evaluate.add_argument("checkpoint", help="a training checkpoint, e.g. RUN_DIR/checkpoints/last.pt")
    evaluate.add_argument(
        "--protocol", default="all", choices=("linear", "knn", "finetune", "all"),
        help="linear (frozen features), knn, finetune (label fraction), or all",
    )
    evaluate.add_argument("--label-fraction", type=float, default=0.1, help="for finetune")
    evaluate.add_argument("--json", action="store_true", help="one JSON object per protocol")
    evaluate.add_argument("--out-dir", default=None, help="default: RUN_DIR/eval")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="e.g. data.dataset=fashion-mnist eval.knn_k=20 eval.linear_protocol=sgd",
    )

    export = sub.add_parser("export", help="export the trained encoder for use elsewhere")
    export.add_argument("checkpoint", help="a training checkpoint, run folder or safetensors export")
    export.add_argument(
        "--format", required=True, choices=("torchvision", "safetensors", "torchscript", "onnx")
    )
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument(
        "--include-head", action="store_true", help="safetensors: keep the projection head too"
    )
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file (and its card)"
    )

    embed = sub.add_parser("embed", help="compute h for image files and folders")
    embed.add_argument("checkpoint", help="a training checkpoint, run folder or safetensors export")
    embed.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    embed.add_argument("--out", required=True, help=".npy (with a .files.txt list) or .parquet")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--device", default="auto")
    embed.add_argument("--quiet", action="store_true")
    embed.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file (and its list)"
    )

    index_embeddings = sub.add_parser(
        "index-embeddings",
        help="embed images into a nearest-neighbour index folder (for simclrkit search)",
    )
    index_embeddings.add_argument(
        "checkpoint", help="a training checkpoint, run folder or safetensors export"
    )
    index_embeddings.add_argument(
        "images", nargs="+",
        help="image files and folders (searched recursively); list files for --dataset "
        "filelist, shard folders for --dataset shards, splits (train, test) for a built-in "
        "dataset such as --dataset mnist5k",
    )
    index_embeddings.add_argument(
        "--out", required=True, help="the index folder: new or empty, or an index with --add"
    )
    index_embeddings.add_argument(
        "--dataset", default="folder",
        choices=("folder", "filelist", "shards", "mnist5k", "mnist", "fashion-mnist", "cifar10",
                 "cifar100", "stl10"),
    )
    index_embeddings.add_argument(
        "--kind", default="auto", choices=("auto", "exact", "hnsw"),
        help="exact (a scan), hnsw (a graph, recall@10 >= 0.95) or auto (exact up to 200,000 "
        "images); fixed when the index is created",
    )
    index_embeddings.add_argument(
        "--add", action="store_true",
        help="add the images the index does not hold yet (same checkpoint)",
    )
    index_embeddings.add_argument("--batch-size", type=int, default=256)
    index_embeddings.add_argument("--device", default="auto")
    index_embeddings.add_argument("--quiet", action="store_true", help="no progress bar")

    search = sub.add_parser(
        "search", help="the indexed images nearest to query images, or groups of near-duplicates"
    )
    search.add_argument("index_dir", metavar="INDEX_DIR", help="written by index-embeddings")
    search.add_argument(
        "queries", nargs="*", metavar="QUERY_IMAGES",
        help="image files and folders (searched recursively), or names of indexed images "
        "(mnist5k:test/7)",
    )
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    search.add_argument("--json", action="store_true", help="JSON on stdout")
    search.add_argument(
        "--duplicates", type=float, default=None, metavar="THRESHOLD",
        help="instead of queries: groups of indexed images linked by cosine >= THRESHOLD",
    )

    show = sub.add_parser(
        "show-augmentations", help="save a grid of source images and their augmented views"
    )
    _add_config_arguments(show, "mnist5k")
    show.add_argument("--out", required=True, help="the PNG file to write")
    show.add_argument("--images", type=int, default=8, help="source images (rows)")
    show.add_argument("--views", type=int, default=6, help="views per image (columns)")
    return parser


def _print_results(summary: dict) -> None:
    from simclrkit.report import number

    evaluation = summary.get("eval", {})
    print(
        f"pretrained {summary['steps']} steps ({summary['epochs']:.1f} epochs) in "
        f"{summary['train_seconds']:.0f}s at {summary['images_per_second']:.0f} images/s; "
        f"final loss {number(summary['final_loss'], '.4f')}"
    )
    for protocol, title in (("linear", "linear evaluation on frozen features"),
                            ("knn", "kNN (k=200) on frozen features")):  # fmt: skip
        if f"{protocol}_top1" in evaluation:
            print(_compared_line(evaluation, protocol, title))


def _compared_line(evaluation: dict, protocol: str, title: str) -> str:
    """``title: top-1 X (random initialisation: Y, +d points; raw pixels: Z, +d points)``."""
    top1 = evaluation[f"{protocol}_top1"]
    context = [
        f"{name}: {evaluation[key]:.4f}, {(top1 - evaluation[key]) * 100:+.1f} points"
        for name, key in (("same encoder at random initialisation", f"random_init_{protocol}_top1"),
                          ("raw pixels", f"raw_pixels_{protocol}_top1"))  # fmt: skip
        if isinstance(evaluation.get(key), float)
    ]
    verdict = ""
    if isinstance(evaluation.get(f"raw_pixels_{protocol}_top1"), float):
        beats = top1 > evaluation[f"raw_pixels_{protocol}_top1"]
        verdict = " - beats raw pixels" if beats else " - does NOT beat raw pixels"
    return f"{title}: top-1 {top1:.4f}" + (f" ({'; '.join(context)})" if context else "") + verdict


def _index(args: argparse.Namespace) -> int:
    import time

    from simclrkit.config import ConfigError
    from simclrkit.index import build_index

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; name the index file, e.g. {out / 'index.npz'}")
    started = time.perf_counter()
    index = build_index(args.dataset, args.root, args.split)
    index.save(out)
    classes = f", {len(index.classes)} classes" if index.labels is not None else ""
    print(
        f"indexed {len(index):,} images{classes} of {args.dataset} {args.root} ({args.split}) in "
        f"{time.perf_counter() - started:.1f}s into {out}; fingerprint {index.fingerprint[:16]}\n"
        f"train on it with: simclrkit pretrain data.dataset={args.dataset} data.index={out} ..."
    )
    return 0


def _pack(args: argparse.Namespace) -> int:
    from simclrkit.pack import pack

    report = pack(
        args.dataset, args.root, args.out, max_side=args.max_side, quality=args.quality,
        samples_per_shard=args.shard_samples, workers=args.workers, quiet=args.quiet,
    )
    for split, result in report.items():
        skipped = (
            f"; skipped {result['skipped']} unreadable files (listed in "
            f"{Path(args.out) / f'{split}.skipped.txt'})" if result["skipped"] else ""
        )
        print(
            f"packed {split}: {result['samples']:,} images into {result['shards']} "
            f"shard{'s' if result['shards'] != 1 else ''} "
            f"({result['bytes'] / 1e6:.1f} MB) in {result['seconds']:.1f}s{skipped}"
        )
    print(f"train on them with: simclrkit pretrain data.dataset=shards data.root={args.out} ...")
    return 0


def _import_tf(args: argparse.Namespace) -> int:
    from simclrkit.config import ConfigError
    from simclrkit.export import save_model_file
    from simclrkit.importtf import read_tf_model
    from simclrkit.modelcard import Trained

    imported = read_tf_model(args.checkpoint, ft_proj_selector=args.ft_proj_selector)
    selector = imported.ft_proj_selector
    if imported.classifier_state is not None and selector is None:
        raise ConfigError(
            f"{args.checkpoint}: the supervised head's input is {imported.classifier_input_dim} "
            "wide, as h and every hidden head layer are, and no graph beside the weights says "
            "which it reads; pass --ft-proj-selector (SimCLRv2's fine-tuned releases: 1; "
            "linear-evaluation heads and SimCLRv1: 0)"
        )
    info = {"step": imported.global_step, "config": {},
            "imported_from": {"source": imported.source, "format": imported.source_format}}
    trained = Trained(imported.encoder_state, imported.head_state, imported.architecture, info,
                      imported.classifier_state, selector or 0)  # fmt: skip
    inputs = [path for path in Path(imported.source).parent.glob("*") if path.is_file()]
    out = save_model_file(trained, args.out, inputs=inputs, overwrite=args.overwrite)
    arch = imported.architecture
    extras = "".join(f", {key} {arch[key]:g}" for key in ("sk_ratio", "se_ratio") if arch[key])
    head = (f"{arch['head_layers']}-layer projection head" if imported.head_state is not None
            else "no projection head")  # fmt: skip
    classifier = (f"a {imported.classifier_state['weight'].shape[0]}-class supervised head on "
                  f"{'h' if not selector else f'head layer {selector}'}"
                  if imported.classifier_state is not None else "no supervised head")  # fmt: skip
    print(f"imported {imported.variables_read} {imported.source_format} variables "
          f"(step {imported.global_step}): {arch['encoder']} width {arch['width']:g}{extras}, "
          f"{head}, {classifier} -> {out}")  # fmt: skip
    for note in imported.notes:
        print(f"note: {note}")
    return 0


def _index_embeddings(args: argparse.Namespace) -> int:
    from simclrkit.search import index_images

    result = index_images(
        args.checkpoint, args.images, args.out, dataset=args.dataset, kind=args.kind,
        add=args.add, batch_size=args.batch_size, device=args.device, quiet=args.quiet,
    )
    count, kind = f"{result['count']:,}", result["kind"]
    if result["added"] or result["created"]:
        done = (f"indexed {result['added']:,} images" if result["created"] else
                f"added {result['added']:,} images ({result['already_indexed']:,} were indexed "
                f"already)")  # fmt: skip
        print(f"{done} into {result['out']}: {count} {result['dim']}-d vectors, {kind}")
    else:
        print(f"nothing added to {result['out']} ({count} vectors, {kind}): "
              f"{result['already_indexed']:,} of the images given were indexed already")  # fmt: skip
    if result["hnsw"] and result["added"]:
        hnsw = result["hnsw"]
        print(f"efSearch {hnsw['ef_search']}: recall@10 {hnsw['recall_at_10']:.3f} on "
              f"{hnsw['recall_queries']} indexed images")  # fmt: skip
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable files (listed in "
              f"{result['skipped_file']})")  # fmt: skip
    return 0


def _search(args: argparse.Namespace) -> int:
    from simclrkit import jsonout
    from simclrkit.config import ConfigError
    from simclrkit.embed import shown_name
    from simclrkit.search import find_duplicates, search_images

    if args.duplicates is not None:
        if args.queries:
            raise ConfigError(
                "--duplicates: lists near-duplicates among the indexed images and takes no "
                f"query images (got {shown_name(args.queries[0])}); drop one or the other"
            )
        groups = find_duplicates(args.index_dir, args.duplicates)
        if args.json:
            print(jsonout.dumps(groups, indent=2))
            return 0
        print(f"{len(groups)} group{'' if len(groups) == 1 else 's'} of near-duplicates "
              f"(cosine >= {args.duplicates:g}) in {args.index_dir}")  # fmt: skip
        for number, group in enumerate(groups, start=1):
            low, high = group["similarity"]["min"], group["similarity"]["max"]
            print(f"group {number}: {len(group['paths'])} images, cosine {low:.4f}-{high:.4f}")
            for path in group["paths"]:
                print(f"  {shown_name(path)}")
        return 0
    if not args.queries:
        raise ConfigError(
            "QUERY_IMAGES: name the images to search for, or pass --duplicates THRESHOLD to "
            "group near-duplicates among the indexed images"
        )
    results = search_images(args.index_dir, args.queries, k=args.k)
    if args.json:
        print(jsonout.dumps(results, indent=2))
        return 0
    for number, result in enumerate(results):
        print(("\n" if number else "") + f"query {shown_name(result['query'])}")
        for rank, neighbour in enumerate(result["neighbours"], start=1):
            print(f"{rank:4d}  {neighbour['similarity']:.4f}  {shown_name(neighbour['path'])}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from simclrkit.config import load_config
    from simclrkit.distill import distill
    from simclrkit.runloop import EXIT_PREEMPTED, Preempted
    from simclrkit.train import NonFiniteLossError

    overrides = [*args.overrides, *([f"distill.teacher={args.teacher}"] if args.teacher else [])]
    config = load_config(args.config, overrides)
    try:
        summary = distill(config, args.run_dir, resume=args.resume, force=args.force,
                          quiet=args.quiet)  # fmt: skip
    except Preempted as stop:
        print(f"simclrkit: {stop}; continue with: simclrkit distill --run-dir {args.run_dir} "
              "--resume", file=sys.stderr)  # fmt: skip
        return EXIT_PREEMPTED
    except NonFiniteLossError as error:
        print(f"simclrkit: error: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    if not summary:  # a torchrun process other than the main one: nothing to say
        return 0
    print(
        f"distilled {summary['steps']} steps ({summary['epochs']:.1f} epochs) in "
        f"{summary['train_seconds']:.0f}s at {summary['images_per_second']:.0f} images/s; "
        f"final loss {summary['final_loss']:.4f}"
    )
    if "student_top1" in summary:
        print(
            f"test top-1: student {summary['student_top1']:.4f}, teacher "
            f"{summary['teacher_top1']:.4f} (they agree on {summary['test_agreement']:.1%})"
        )
    print(f"run folder: {args.run_dir} (report.md, summary.json, checkpoints/last.pt)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may also follow the options (`pretrain --resume train.epochs=3`),
    # which argparse alone refuses once an option has ended the positional run.
    args, extra = parser.parse_known_args(argv)
    if extra:
        # ...and so may image paths (`search DIR --json a.png`, `embed CKPT --out h.npy b/`).
        trailing = next((name for name in ("overrides", "queries", "images")
                         if hasattr(args, name)), None)  # fmt: skip
        keys_only = trailing == "overrides"
        if trailing is None or any(a.startswith("-") or (keys_only and "=" not in a)
                                   for a in extra):  # fmt: skip
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    # Imports stay inside main so `simclrkit --help` is instant.
    from simclrkit.config import ConfigError, list_recipes, load_config

    try:
        if args.command == "recipes":
            for name, source in list_recipes().items():
                print(f"{name:24s} {source}")
            return 0
        if args.command == "index":
            return _index(args)
        if args.command == "pack":
            return _pack(args)
        if args.command == "evaluate":
            from simclrkit.eval_report import evaluate_checkpoint, format_results_table

            results = evaluate_checkpoint(
                args.checkpoint, protocols=args.protocol, label_fraction=args.label_fraction,
                overrides=args.overrides, out_dir=args.out_dir, device=args.device,
                seed=args.seed, quiet=args.json,
            )
            if not results:  # a torchrun process other than the main one: nothing to say
                return 0
            if args.json:
                for result in results:
                    print(json.dumps(result))
            else:
                print(format_results_table(results))
            return 0
        if args.command == "export":
            from simclrkit.export import export_checkpoint, model_card_path

            out = export_checkpoint(
                args.checkpoint, args.format, args.out, include_head=args.include_head,
                overwrite=args.overwrite,
            )
            print(f"wrote {out} and its model card {model_card_path(out)}")
            return 0
        if args.command == "embed":
            from simclrkit.embed import embed_images

            result = embed_images(
                args.checkpoint, args.images, args.out, batch_size=args.batch_size,
                device=args.device, quiet=args.quiet, overwrite=args.overwrite,
            )
            print(
                f"embedded {result['count']} images ({result['dim']}-d) into {result['out']}; "
                f"skipped {len(result['skipped'])} unreadable files"
            )
            return 0
        if args.command == "show-augmentations":
            from simclrkit.report import preview_augmentations

            out = preview_augmentations(
                load_config(args.config, args.overrides), args.out,
                num_images=args.images, num_views=args.views,
            )
            print(f"wrote {out}: {args.images} images x {args.views} views as pretraining draws them")
            return 0
        if args.command == "report":
            from simclrkit.devices import select_device
            from simclrkit.report import write_report
            from simclrkit.runpage import write_run_page

            if not (Path(args.run_dir) / "metrics.jsonl").is_file():
                raise ConfigError(f"{args.run_dir} is not a run folder (it has no metrics.jsonl)")
            markdown = write_report(args.run_dir)
            page = write_run_page(args.run_dir, device=select_device(args.device, key="--device"))
            print(f"wrote {markdown} and {page}")
            return 0
        if args.command == "import-tf":
            return _import_tf(args)
        if args.command == "index-embeddings":
            return _index_embeddings(args)
        if args.command == "search":
            return _search(args)
        if args.command == "distill":
            return _distill(args)
        if args.command == "pretrain":
            from simclrkit.runloop import EXIT_PREEMPTED, Preempted
            from simclrkit.train import NonFiniteLossError, pretrain

            config = load_config(args.config, args.overrides)
            try:
                summary = pretrain(
                    config, Path(args.run_dir), resume=args.resume, force=args.force,
                    quiet=args.quiet,
                )
            except Preempted as stop:
                print(
                    f"simclrkit: {stop}; continue with: simclrkit pretrain --run-dir "
                    f"{args.run_dir} --resume",
                    file=sys.stderr,
                )
                return EXIT_PREEMPTED
            except NonFiniteLossError as error:
                print(f"simclrkit: error: {error}", file=sys.stderr)
                return EXIT_NONFINITE
            if summary.get("rank", 0) == 0:  # under torchrun, one report, not one per process
                _print_results(summary)
                print(f"run folder: {args.run_dir} (report.html, report.md, summary.json, checkpoints/last.pt)")
            return 0
    except NotImplementedError as error:
        from simclrkit.devices import missing_operation

        message = missing_operation(error)
        if message is None:
            raise
        print(f"simclrkit: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (UserError, OSError, MemoryError) as error:
        # Input, files, folders, disks, memory: one line that names the thing and the fix.
        print(f"simclrkit: error: {describe(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 1


def entry() -> None:  # pragma: no cover - thin wrapper for python -m
    # The command owns its process, so it may pick the allocator: 2 MB pages for PyTorch's
    # large CPU tensors make their page faults (a large share of a CPU step's time, and of the
    # augmentation's at 224 px) several times cheaper; measured +6-8% on the CPU training step
    # (docs/benchmarks.md). Read by PyTorch at its first allocation, so it is set before any
    # import of torch; a value the user set wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
