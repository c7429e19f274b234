"""The trainer's command line: ``python -m geochange.trainer`` (also ``geochange train`` / ``geochange mtkd``).

    train CONFIG.yaml [--set key=value ...] [--resume [CHECKPOINT] | --restart] [--until N] [--backbone-weights PATH]
    mtkd {partition,original,teachers,distill,router,run} CONFIG.yaml [--set key=value ...] [--restart]
    export RUN_DIR NAME --task TEXT --data-licence TEXT [--zoo DIR] [--gsd M] [--replace]

Under ``torchrun --nproc-per-node N -m geochange.trainer ...`` the same commands run data-parallel.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from geochange.engine.cli import run_command
from geochange.engine.process import configure_process
from geochange.engine.progress import sigterm_cancels


def _cmd_train(args) -> int:
    from geochange.trainer.config import load
    from geochange.trainer.loop import Trainer

    overrides = list(args.set)
    if args.backbone_weights:  # a shortcut for --set model.backbone_weights=PATH
        overrides.append(f"model.backbone_weights={json.dumps(args.backbone_weights)}")
    trainer = Trainer(load(args.config, overrides))
    resume = True if args.resume == "" else args.resume or False  # "" = the flag without a path
    results = trainer.fit(resume=resume, until=args.until, replace=args.restart)
    if trainer.main:
        if results is None:
            print(f"stopped at iteration {trainer.iteration}; continue with --resume ({trainer.checkpoint_path})")
        else:
            _report(results, trainer.package_path)
    return 0


def _report(results: dict, package) -> None:
    from geochange.engine.metrics import format_summary
    from geochange.trainer.evaluation import format_car_table

    for split in ("val", "test"):
        if results.get(split):
            print(f"{split} (best iteration {results['best_iteration']}):")
            print(format_summary(results[split]))
            print(format_car_table(results[split]))
    print(package)


def _cmd_mtkd(args) -> int:
    from geochange.trainer.config import load
    from geochange.trainer.mtkd import Pipeline

    pipeline = Pipeline(load(args.config, args.set))
    resume = not args.restart
    if args.step == "run":
        print(json.dumps({k: v and v["global"] for k, v in pipeline.run(resume).items()}, indent=2))
    elif args.step in ("partition", "router"):
        result = getattr(pipeline, args.step)()
        if args.step == "partition":
            print(json.dumps({s: {k: len(v) for k, v in result[s].items()} for s in ("train", "val")}))
        else:
            print(result["router"])
    else:
        getattr(pipeline, args.step)(resume)
    return 0


def _cmd_export(args) -> int:
    from geochange.trainer.export import export_run

    record = export_run(args.run_dir, args.name, task=args.task, data_licence=args.data_licence, gsd=args.gsd,
                        replace=args.replace, **({"zoo": Path(args.zoo)} if args.zoo else {}))
    print(f"{args.name}: {record['file']}, {record['bytes']:,} bytes, sha256 {record['sha256']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geochange", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_options(p):
        p.add_argument("config", help="experiment YAML (see trainer/configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set data.batch=4 (repeatable)")

    p = sub.add_parser("train", help="train one config into a model package")
    config_options(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                       help="continue from work_dir/last.pt (or the given checkpoint)")
    start.add_argument("--restart", action="store_true",
                       help="replace the earlier run in work_dir (without it, a run into a work_dir that holds one "
                            "is refused)")
    p.add_argument("--until", type=int, help="stop after this iteration (a checkpoint is written)")
    p.add_argument("--backbone-weights", metavar="PATH",
                   help="local ImageNet weights for the backbone (timm checkpoint; MiT also SegFormer/mmseg keys)")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("mtkd", help="the MTKD pipeline: partition, original, teachers, distill, router, run")
    p.add_argument("step", choices=("partition", "original", "teachers", "distill", "router", "run"))
    config_options(p)
    p.add_argument("--restart", action="store_true", help="start training steps afresh instead of resuming")
    p.set_defaults(run=_cmd_mtkd)

    p = sub.add_parser("export", help="a finished run's best package into the model zoo (fp16 weights, checked)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's work_dir (with best.safetensors and results.json)")
    p.add_argument("name", help="the zoo name, e.g. m2cd_mit_b0_flood")
    p.add_argument("--task", required=True, help='what the model is for, e.g. "flood: optical before, SAR after"')
    p.add_argument("--data-licence", required=True, help="the licence of the training data")
    p.add_argument("--zoo", help="the zoo folder (default: zoo/ beside the engine)")
    p.add_argument("--gsd", type=float, help="metres per pixel of the training imagery (default: the run "
                                             "config's data.gsd; for runs made before it was recorded)")
    p.add_argument("--replace", action="store_true", help="replace the zoo's model of this name")
    p.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    with sigterm_cancels(program=argv is None):  # python -m geochange.trainer, torchrun: SIGTERM cancels
        args = build_parser().parse_args(argv)
        configure_process()  # every command trains or tests models
        try:
            return run_command(args)
        finally:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
