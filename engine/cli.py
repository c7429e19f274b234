"""The ``geochange`` command line: detect, detect-many, evaluate, assess, import-weights, info, zoo, models; train,
mtkd and export come from the trainer through the ``geochange.commands`` entry points."""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import select
import sys
from pathlib import Path

from geochange.engine.contracts import OBJECT_IOU, VECTOR_FORMATS, output_names
from geochange.engine.errors import GeoChangeError
from geochange.engine.options import DETECT, EVALUATE, DetectOptions, flag, names, number_or_word, specs
from geochange.engine.progress import raise_if_stopped, sigterm_cancels


def _cmd_detect(args) -> int:
    from geochange.engine.distributed import distributed_detect, launched_by_torchrun
    from geochange.engine.detect import detect
    from geochange.engine.process import configure_process
    from geochange.engine.progress import TqdmProgress

    options = parsed_options(args, DETECT)
    configure_process(threads=options.pop("threads"))
    out = Path(args.out)
    names = output_names(args.vector_format)
    run = distributed_detect if launched_by_torchrun() else detect
    with contextlib.closing(TqdmProgress(unit="%")) as progress:
        result = run(args.pre, args.post, args.model, **{k: out / v for k, v in names.items()}, size_gdal_cache=True,
                     progress=progress, **options)
    if result is None:  # a rank other than 0 of a torchrun
        return 0
    unit = "m2" if result.grid.crs is not None else "px (no CRS: a pixel grid)"
    print(f"{result.polygon_count} change polygons, {result.changed_area_m2:,.0f} {unit} changed")
    for path in (result.probability, result.mask, result.polygons):
        print(path)
    return 0


def _cmd_detect_many(args) -> int:
    from collections import Counter

    from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, PAIR_SKIPPED, SUMMARY_FILES
    from geochange.engine.many import detect_many
    from geochange.engine.pairs import pairs_from
    from geochange.engine.progress import TqdmProgress

    with contextlib.closing(TqdmProgress("pairs", unit="pair")) as progress:
        rows = detect_many(pairs_from(args.pairs, args.pre_glob, args.post_glob), args.model, args.out,
                           scheduler=args.scheduler, workers=args.workers, force=args.force,
                           vector_format=args.vector_format, listed_in=args.pairs, progress=progress,
                           **parsed_options(args, DETECT))
    counts = Counter(row["status"] for row in rows)
    print(f"{len(rows)} pairs: {counts[PAIR_DONE]} done, {counts[PAIR_SKIPPED]} complete already, "
          f"{counts[PAIR_FAILED]} failed")
    for name in SUMMARY_FILES:
        print(Path(args.out) / name)
    return 1 if counts[PAIR_FAILED] else 0


def _cmd_evaluate(args) -> int:
    from geochange.engine.atomic import atomic_path, check_outputs
    from geochange.engine.evaluate import dataset_pairs, evaluate_folder
    from geochange.engine.metrics import format_summary, metrics_json
    from geochange.engine.package import load_package
    from geochange.engine.process import configure_process
    from geochange.engine.progress import TqdmProgress
    from geochange.engine.zoo import resolve_model

    configure_process()
    # the model's file, not its zoo name, and the dataset's images and labels: a JSON in their place replaced them
    check_outputs((args.json,), (resolve_model(args.model), *itertools.chain(*dataset_pairs(args.data))))
    with contextlib.closing(TqdmProgress("evaluate", unit="image")) as progress:
        summary = evaluate_folder(load_package(args.model), args.data, ignore_value=args.ignore_value,
                                  progress=progress, **parsed_options(args, EVALUATE))
    print(format_summary(summary))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(metrics_json({"model": str(args.model), "data": str(args.data), **summary}))
    return 0


def _cmd_assess(args) -> int:
    from geochange.engine.assess import assess, format_assessment
    from geochange.engine.atomic import atomic_path, check_outputs
    from geochange.engine.metrics import metrics_json

    check_outputs((args.out_raster, args.json), (args.prediction, args.reference, args.aoi))
    summary = assess(args.prediction, args.reference, aoi=args.aoi, ignore_value=args.ignore_value,
                     object_iou=args.object_iou, out_raster=args.out_raster)
    print(format_assessment(summary))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(metrics_json({"prediction": args.prediction, "reference": args.reference, **summary}))
    return 0


def _cmd_import(args) -> int:
    from geochange.engine.importers import import_weights

    print(import_weights(args.format, args.source, args.destination))
    return 0


def _cmd_info(args) -> int:
    from geochange.engine.errors import PackageError
    from geochange.engine.header import read_metadata
    from geochange.engine.package import describe_model
    from geochange.engine.zoo import resolve_model

    model = resolve_model(args.model)
    stored = read_metadata(model)  # refuses what is not a package
    try:
        described = describe_model(model)
    except PackageError:  # a malformed manifest: show it as stored (JSON escapes control characters)
        print(json.dumps(stored, indent=2))
        raise
    print(json.dumps(described["manifest"], indent=2) if args.json else described["text"])
    return 0


def _cmd_zoo(args) -> int:
    from geochange.engine.zoo import describe_zoo, format_zoo

    entries = describe_zoo()
    print(json.dumps(entries, indent=2) if args.json else format_zoo(entries))
    return 0


def _cmd_models(args) -> int:
    from geochange.engine.models import create, list_models, spec
    from geochange.engine.models.stats import count_gflops, count_params

    def cell(value, width: int) -> str:  # a figure not counted (no --flops) or not published: "-"
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"

    print(f"{'name':<18}{'params M':>10}{'paper':>9}{'GFLOPs@256':>12}{'paper':>9}  description")
    for name in list_models():
        s = spec(name)
        model = create(name).eval()
        paper = s.paper
        gflops = count_gflops(model, size=256) if args.flops else None
        paper_gflops = paper.get("gflops") if paper.get("gflops_input", 256) == 256 else None
        print(f"{name:<18}{count_params(model, s.training_only) / 1e6:>10.3f}{cell(paper.get('params_m'), 9)}"
              f"{cell(gflops, 12)}{cell(paper_gflops, 9)}  {s.description}")
    print("params: the inference model (training-only heads left out); GFLOPs: multiply-adds as the model "
          "runs, torch.utils.flop_counter / 2 (the M2CD and Changer heads fuse each level before resizing it, "
          "the same function with fewer than the papers count: README, Models)")
    return 0


def _band_list(text: str) -> list[int]:
    from geochange.engine.bands import band_list

    try:
        return band_list(text)
    except GeoChangeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# How each kind of option is read from the command line (booleans are flags).
PARSERS = {"int": int, "float": float, "bands": _band_list, "text": str, "crs": str, "choice": str, "vector": str}


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """``command``'s options (``engine.options``) as arguments; their values are checked when the
    options are made (``parsed_options``), with the same messages as for any other caller."""
    for spec in specs(command):
        meta, name = spec.metadata, flag(spec.name)
        text = meta["help"].replace("%", "%%")
        if meta["kind"] == "bool":
            parser.add_argument(name, action="store_true", help=text)
            continue
        shown = f" (default {spec.default})" if spec.default is not None else ""
        kind = functools.partial(number_or_word, words=meta["words"]) if meta["words"] else PARSERS[meta["kind"]]
        parser.add_argument(name, type=kind, default=spec.default, choices=meta["choices"] or None, help=text + shown)


def parsed_options(args: argparse.Namespace, command: str) -> dict:
    """``command``'s options from parsed arguments, checked (``DetectOptions``)."""
    options = DetectOptions.of({name: getattr(args, name) for name in names(command)}, command)
    return {name: getattr(options, name) for name in names(command)}


def build_parser() -> argparse.ArgumentParser:
    def add_vector_format(p) -> None:
        p.add_argument("--vector-format", choices=VECTOR_FORMATS, default="gpkg",
                       help="the polygons' file: GeoPackage (default), GeoJSON or shapefile")

    parser = argparse.ArgumentParser(prog="geochange", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="change probability, mask and polygons for a raster pair")
    p.add_argument("pre", help="pre-event raster")
    p.add_argument("post", help="post-event raster")
    p.add_argument("--model", required=True, help="model package (.safetensors) or a zoo model's name")
    p.add_argument("--out", required=True, help="output folder")
    add_options(p, DETECT)
    add_vector_format(p)
    p.set_defaults(run=_cmd_detect)

    p = sub.add_parser("detect-many", help="detection over many raster pairs on a Dask cluster, with a summary")
    p.add_argument("pairs", nargs="?", help="CSV file of the pairs: columns pre, post, optionally name (the pair's "
                                            "folder under --out; default: the post file's name) and aoi; paths "
                                            "relative to the CSV's folder")
    p.add_argument("--pre-glob", help="instead of a CSV: the pre rasters, a glob pattern (quoted), e.g. 'before/*.tif'")
    p.add_argument("--post-glob", help="the post rasters, e.g. 'after/*.tif': files pair where the text the "
                                       "wildcards match is the same, which names the pair")
    p.add_argument("--model", required=True, help="model package (.safetensors) or a zoo model's name")
    p.add_argument("--out", required=True, help="output folder: a folder a pair, summary.gpkg and summary.csv")
    p.add_argument("--scheduler", help="a Dask scheduler's address (tcp://HOST:8786): run on its cluster, whose "
                                       "workers see the same paths. Default: a cluster on this machine")
    p.add_argument("--workers", type=int, help="workers of the cluster on this machine (default: one a GPU, else "
                                               "one a core, as many as the memory holds at a worker's measured peak)")
    p.add_argument("--force", action="store_true", help="run the pairs whose outputs are complete again")
    add_options(p, DETECT)
    add_vector_format(p)
    p.set_defaults(run=_cmd_detect_many)

    p = sub.add_parser("evaluate", help="metrics of a model on a folder dataset A/ B/ label/")
    p.add_argument("--model", required=True, help="model package (.safetensors) or a zoo model's name")
    p.add_argument("--data", required=True, help="folder with A/, B/, label/")
    p.add_argument("--json", help="also write the metrics as JSON here")
    p.add_argument("--ignore-value", type=float,
                   help="label value of unlabelled pixels, left out of every metric (e.g. 255 beside 0/1); a "
                        "label file's own nodata value is left out too")
    add_options(p, EVALUATE)
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("assess", help="accuracy of a change mask or polygons against reference polygons or raster")
    p.add_argument("--prediction", required=True, help="change mask (geochange detect's) or change polygons")
    p.add_argument("--reference", required=True, help="reference raster (0 and 1 or 255 = change) or polygons "
                                                      "(inside = change), on any grid (reprojected)")
    p.add_argument("--aoi", help="polygons (FILE or FILE|layername=NAME) outside which nothing is assessed")
    p.add_argument("--ignore-value", type=float, help="reference raster value of unlabelled pixels, left out "
                                                         "(as its own nodata value is)")
    p.add_argument("--object-iou", type=float, default=OBJECT_IOU,
                   help=f"IoU at which a predicted object matches a reference object (default {OBJECT_IOU})")
    p.add_argument("--out-raster", help="also write a GeoTIFF of TN 0, TP 1, FP 2, FN 3, not assessed 255")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.set_defaults(run=_cmd_assess)

    p = sub.add_parser("import-weights", help="convert a foreign checkpoint into a model package")
    p.add_argument("--format", required=True, help="checkpoint format (tinycd)")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(run=_cmd_import)

    p = sub.add_parser("info", help="print a model package's manifest")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="the raw JSON manifest")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("zoo", help="the trained models shipped in zoo/, usable by name as --model NAME")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(run=_cmd_zoo)

    p = sub.add_parser("models", help="list the registered architectures with their size")
    p.add_argument("--flops", action="store_true", help="also count FLOPs at 256x256 (slow)")
    p.set_defaults(run=_cmd_models)

    # Listed for --help only: main() hands these commands to the package that provides them.
    for name in layer_commands():
        sub.add_parser(name, help=f"(from a layer above the engine: geochange {name} --help)", add_help=False)
    return parser


def layer_commands() -> dict:
    """Commands that layers above the engine (the trainer) add through the entry-point group
    ``geochange.commands``: the engine never imports them by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="geochange.commands")}


def main(argv: list[str] | None = None) -> int:
    # Run as a program, SIGTERM cancels (exit 2, "cancelled"), leaving no temporary file.
    with sigterm_cancels(program=argv is None):
        argv = sys.argv[1:] if argv is None else list(argv)
        commands = layer_commands() if argv and not argv[0].startswith("-") else {}
        if argv and argv[0] in commands:
            return commands[argv[0]].load()(argv)
        return run_command(build_parser().parse_args(argv))


def run_command(args) -> int:
    """Run a parsed command; user errors print as one line (exit 2), never as a traceback."""
    try:
        try:
            status = args.run(args)
            sys.stdout.flush()  # here, where a reader gone is caught below, not at exit
            return status
        except Exception:
            raise_if_stopped()  # a cancel that a library turned into its own error
            raise
    except GeoChangeError as e:
        print(f"geochange: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("geochange: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stdout_gone():
            raise
        # The reader went (`geochange models | head`): what is left has nowhere to go, nor has Python's flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone; not where that cannot be told (no ``poll`` on
    Windows, an output without a file descriptor)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False
    return any(event & select.POLLERR for _, event in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
