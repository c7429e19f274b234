"""MTKD (the JL1-CD paper): CAR partitions, the original model M_O, one teacher per partition, the
distilled student, and the router package for O-P inference.

Steps (``geochange mtkd <step> CONFIG``; ``run`` does all and skips finished ones), each in a folder of
the config's ``work_dir``:

* ``partition`` -> ``partitions.json``: the training and validation items per CAR partition. With
  thresholds ``t1 < t2`` a sample with ground-truth CAR < t1 is small, < t2 medium, else large (one
  threshold: small / large). The same strict rule picks the teacher of a sample during distillation.
  A label's CAR counts its labelled pixels only: the authors' training code divides by all pixels,
  counting rotation padding as change; here padding moves no sample to another teacher.
* ``original`` -> ``original/``: M_O, the config trained on all data.
* ``teachers`` -> ``teacher_<name>/``: the config (with ``mtkd.teachers`` merged over it) trained on one
  partition from the same initialisation as M_O (same seed, same initial weights), validated on the
  validation items of that partition (all of them if it has none).
* ``distill`` -> ``student/``: the config with ``mtkd.distill`` merged over it, initialised from M_O's
  best weights; loss = task loss + lambda x MSE(student logits, teacher logits), the teacher of each
  sample chosen by its CAR after augmentation; teachers frozen, in eval mode, without gradients.
  ``mtkd.lambda`` defaults to the authors' value for the architecture.
* ``router`` -> ``router.safetensors`` and ``router_results.json`` (O-P metrics on the test split).

``made_from.json`` records what each step was made from (its config less the keys that only change how a
run reports, its partition's items, the sha256 of the packages it reads). A step whose record differs from
what it would be made from now (other thresholds, another config, a retrained teacher) is stale: its
outputs are removed and it is done again, from the start. A training step whose package cannot be read (a
corrupt copy) is not finished: a step reading it stops before it removes anything, naming the package and the
step to make again (resumed, which puts back the package its checkpoint kept).

The router package is the engine's (``engine.package``: M_O and the teachers in one ``.safetensors`` file,
routed at inference by M_O's predicted CAR with <=, as the authors' test code does: ``engine.routing``);
``geochange detect`` runs it like any model.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from geochange.engine.atomic import atomic_path
from geochange.engine.errors import PackageError
from geochange.engine.metrics import metrics_json
from geochange.engine.zoo import sha256
from geochange.engine.package import load_package, load_router, read_manifest, read_shapes, save_router
from geochange.engine.routing import change_area_ratio, route
from geochange.trainer.config import ConfigError, derive
from geochange.trainer.data import IGNORE, build_splits
from geochange.trainer.evaluation import test_predictions, test_predictor
from geochange.trainer.losses import teacher_logits
from geochange.trainer.loop import Trainer

STEPS = ("partition", "original", "teachers", "distill", "router")
# Config keys that change how a run reports, not what it makes: changing them redoes no step.
RUN_ONLY = (("train", "log_interval"), ("train", "tensorboard"), ("train", "checkpoint_interval"),
            ("data", "workers"))
# lambda of the distillation term in the authors' code (methods.md); Changer-MiT-b1 from JL1-CD Table II.
DEFAULT_LAMBDA = {"changer_mit_b0": 1e-4, "changer_mit_b1": 1e-3, "tinycd": 5e-3}


def _read_json(path: Path, remedy: str):
    """``path``'s JSON; a file cut short (a full disk, a killed copy) is named, with ``remedy``."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"mtkd: {path} is not readable JSON ({e}); {remedy}") from None


def partition_names(thresholds) -> list[str]:
    return ["small", "large"] if len(thresholds) == 1 else \
        ["small", "medium", "large"] if len(thresholds) == 2 else [f"p{i}" for i in range(len(thresholds) + 1)]


class TeacherRouter:
    """Distillation targets: each sample's logits from the teacher of its ground-truth CAR."""

    def __init__(self, teachers: list[torch.nn.Module], thresholds):
        self.teachers, self.thresholds = teachers, list(thresholds)
        self.device = None
        for teacher in teachers:
            teacher.eval().requires_grad_(False)

    def __call__(self, pre: torch.Tensor, post: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.device != pre.device:  # the teachers follow the student's device
            self.device = pre.device
            for teacher in self.teachers:
                teacher.to(self.device)
        which = route(change_area_ratio(label == 1, label != IGNORE), self.thresholds)
        out = None
        for i, teacher in enumerate(self.teachers):
            index = (which == i).nonzero()[:, 0]
            if index.numel():
                logits = teacher_logits(teacher, pre[index], post[index])
                if out is None:
                    out = logits.new_empty((len(pre), *logits.shape[1:]))
                out[index] = logits
        return out


# --- Steps ---------------------------------------------------------------------------------------

class Pipeline:
    """The MTKD steps of one config (which must have an ``mtkd`` section)."""

    def __init__(self, cfg: dict):
        if "mtkd" not in cfg:
            raise ConfigError("an MTKD config needs an mtkd section (thresholds, teachers, distill, lambda)")
        self.cfg, self.root = cfg, Path(cfg["work_dir"])
        self.thresholds = cfg["mtkd"]["thresholds"]
        self.names = partition_names(self.thresholds)
        self._splits = None

    @property
    def splits(self) -> dict:
        if self._splits is None:
            self._splits = build_splits(self.cfg["data"]["datasets"])
        return self._splits

    def step_dir(self, step: str, name: str | None = None) -> Path:
        return self.root / {"original": "original", "distill": "student"}.get(step, f"teacher_{name}")

    def outputs(self, key: str) -> Path:
        """Where step ``key`` (``partition``, ``original``, ``teacher_<name>``, ``distill``, ``router``)
        writes."""
        if key in ("partition", "router"):
            return self.root / {"partition": "partitions.json", "router": "router.safetensors"}[key]
        return self.step_dir(*key.split("_", 1)) if key.startswith("teacher_") else self.step_dir(key)

    def _step_keys(self, step: str) -> list[str]:
        return [f"teacher_{n}" for n in self.names] if step == "teachers" else [step]

    def done(self, step: str) -> bool:
        """Every output of ``step`` is there and was made from what it would be made from now."""
        record = self._record()
        return all(record.get(key) == self.made_from(key) and self._finished(key) for key in self._step_keys(step))

    def _finished(self, key: str) -> bool:
        out = self.outputs(key)
        if key == "router":  # its package is written before its test: a run killed between has not finished it
            return out.is_file() and (self.root / "router_results.json").is_file()
        return out.is_file() if key == "partition" else (out / "results.json").is_file() and not self._unreadable(key)

    def _unreadable(self, key: str) -> str | None:
        """Why training step ``key``'s package cannot be read, and how to make it again; None when it can
        (its manifest and tensor table are read, no tensor)."""
        path = self.outputs(key) / "best.safetensors"
        try:
            read_manifest(path)
            read_shapes(path)
            return None
        except PackageError as e:
            step = "teachers" if key.startswith("teacher_") else key
            return (f"mtkd: {e}; make the {step} step again: run `geochange mtkd {step}` (a resumed run puts back "
                    f"the package its checkpoint kept), or `geochange mtkd {step} --restart` to train it anew")

    def _refuse_unreadable(self, key: str) -> None:
        """Stop what goes on from step ``key``'s package (a later step, a resumed run) before it removes
        anything, when that package is there, or should be, and cannot be read."""
        out = self.outputs(key)
        if (out / "results.json").is_file() or (out / "best.safetensors").exists():
            problem = self._unreadable(key)
            if problem:
                raise ConfigError(problem)

    # -- what each step is made from --

    def _record(self) -> dict:
        path = self.root / "made_from.json"
        return _read_json(path, f"it records what the steps' outputs in {self.root} were made from, which cannot be "
                                "told without it: move them away (or choose another work_dir) and make them again"
                          ) if path.is_file() else {}

    def made_from(self, key: str) -> dict:
        """What step ``key``'s outputs are made from, as JSON values (where a run writes and which device
        it runs on are left out: they do not change what it makes)."""
        def recipe(update: dict) -> dict:
            cfg = derive(self.cfg, update)
            for section, key in RUN_ONLY:
                cfg[section].pop(key)
            return {k: v for k, v in cfg.items() if k not in ("work_dir", "device", "mtkd")}

        def digest(keys) -> dict:  # the packages read, by their contents: a step done again is noticed
            return {k: sha256(self.outputs(k) / "best.safetensors") if (self.outputs(k) / "best.safetensors").is_file()
                    else None for k in keys}

        teachers = [f"teacher_{n}" for n in self.names]
        if key == "partition":
            made = {"thresholds": self.thresholds, "datasets": self.cfg["data"]["datasets"]}
        elif key == "original":
            made = {"config": recipe({})}
        elif key.startswith("teacher_"):
            name, parts = key.split("_", 1)[1], self._partitions()
            made = {"config": recipe(self.cfg["mtkd"]["teachers"]),
                    "items": {s: parts[s][name] for s in ("train", "val")}}
        elif key == "distill":
            made = {"config": recipe(self.cfg["mtkd"]["distill"]), "lambda": self.distill_weight(),
                    "thresholds": self.thresholds, "steps": digest(["original", *teachers])}
        else:
            made = {"thresholds": self.thresholds, "test": self.cfg["test"],
                    "steps": digest(["original", *teachers])}
        return json.loads(json.dumps(made, sort_keys=True))

    def _begin(self, key: str) -> bool:
        """Make way for step ``key``: True when what is there was made from the same inputs (a run may
        resume); otherwise its outputs are removed and the new inputs recorded (by the first process of a
        torchrun only; the others meet it in the Trainer's process group before they read anything)."""
        record, made = self._record(), self.made_from(key)
        if record.get(key) == made:
            return True
        if int(os.environ.get("RANK", "0")) != 0:
            return False
        out = self.outputs(key)
        if out.exists():
            if key not in record:  # not made by this pipeline (a work_dir over someone's folder): never removed
                raise ConfigError(f"mtkd: {out} is in the way and was not made by this pipeline (made_from.json has "
                                  "no record of it); move it, or choose another work_dir")
            print(f"mtkd: {out} was made from other inputs; doing it again", file=sys.stderr)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "made_from.json") as tmp:
            tmp.write_text(json.dumps({**record, key: made}, indent=2))
        return False

    def partition(self) -> dict:
        self._begin("partition")
        out = {"thresholds": self.thresholds,
               "rule": "small if CAR < t1, medium if CAR < t2, else large (CAR over labelled pixels)"}
        for split in ("train", "val"):
            groups = {name: [] for name in self.names}
            for item in self.splits[split]:
                label = item.load()[2]
                car = change_area_ratio(label == 1, label != IGNORE)
                groups[self.names[int(route(car, self.thresholds))]].append(item.id)
            out[split] = groups
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "partitions.json") as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        return out

    def _partitions(self) -> dict:
        """The partitions, made if need be; one without a training sample is refused (no teacher can
        learn it) before any step trains."""
        if not self.done("partition"):
            self.partition()
        path = self.root / "partitions.json"
        parts = _read_json(path, "run `geochange mtkd partition` to make it again")
        for name in self.names:
            if not parts["train"][name]:
                raise ConfigError(f"mtkd: the {name} partition has no training sample ({path}); "
                                  "change mtkd.thresholds")
        return parts

    def _train(self, key: str, cfg: dict, resume: bool, **options) -> dict | None:
        same = self._begin(key)  # before the Trainer, which would read a stale checkpoint
        trainer = Trainer(cfg, **options)
        # A resumed run puts back the package its checkpoint kept: an unreadable copy there is mended so.
        return trainer.fit(resume=resume and same and trainer.checkpoint_path.is_file())

    def original(self, resume: bool = True):
        cfg = derive(self.cfg, {"work_dir": str(self.step_dir("original"))})
        return self._train("original", cfg, resume, splits=self.splits, method="mtkd-original")

    def teachers(self, resume: bool = True):
        parts = self._partitions()
        for name in self.names:
            if self.done(f"teacher_{name}"):
                continue
            chosen = {s: set(parts[s][name]) for s in ("train", "val")}
            splits = {"train": [i for i in self.splits["train"] if i.id in chosen["train"]],
                      "val": [i for i in self.splits["val"] if i.id in chosen["val"]] or self.splits["val"],
                      "test": []}
            cfg = derive(self.cfg, {**self.cfg["mtkd"]["teachers"],
                                    "work_dir": str(self.step_dir("teacher", name))})
            self._train(f"teacher_{name}", cfg, resume, splits=splits, method=f"mtkd-teacher-{name}")

    def distill_weight(self) -> float:
        arch = self.cfg["model"]["architecture"]
        weight = self.cfg["mtkd"]["lambda"]
        if weight is None:
            if arch not in DEFAULT_LAMBDA:
                raise ConfigError(f"mtkd.lambda: no default for {arch}; set it")
            weight = DEFAULT_LAMBDA[arch]
        return float(weight)

    def _require(self, step: str) -> None:
        """The original and teachers steps are done and their packages can be read: ``step`` reads them
        only after its own earlier outputs are removed."""
        for needed in ("original", "teachers"):
            for key in self._step_keys(needed):
                self._refuse_unreadable(key)
            if not self.done(needed):
                raise ConfigError(f"mtkd {step}: the {needed} step is missing or was made from other inputs "
                                  f"(thresholds, config); run `geochange mtkd {needed}` (or `run`) first")

    def distill_trainer(self) -> Trainer:
        """The student's run: initialised from M_O's best weights, the teachers behind a router."""
        self._require("distill")
        original = self.step_dir("original") / "best.safetensors"
        teachers = [load_package(self.step_dir("teacher", n) / "best.safetensors").model for n in self.names]
        cfg = derive(self.cfg, {**self.cfg["mtkd"]["distill"], "work_dir": str(self.step_dir("distill")),
                                "model": {"init": str(original), "backbone_weights": None}})
        return Trainer(cfg, splits=self.splits, teacher=TeacherRouter(teachers, self.thresholds),
                       distill_weight=self.distill_weight(), method="mtkd")

    def distill(self, resume: bool = True):
        self._require("distill")  # before anything of an earlier student is removed
        same = self._begin("distill")
        trainer = self.distill_trainer()
        return trainer.fit(resume=resume and same and trainer.checkpoint_path.is_file())

    def router(self) -> dict:
        """Write the O-P router package; its metrics on the test split (TTA as configured)."""
        self._require("router")
        self._begin("router")
        members = {"original": self.step_dir("original") / "best.safetensors",
                   **{n: self.step_dir("teacher", n) / "best.safetensors" for n in self.names}}
        path = save_router(self.root / "router.safetensors", members["original"],
                           [(n, members[n]) for n in self.names], self.thresholds)
        results = {"router": str(path), "test": None}
        if self.splits["test"]:
            predictor = test_predictor(load_router(path), self.cfg["device"], self.cfg["test"],
                                       self.cfg["data"]["sar_db"])
            results["test"] = test_predictions(predictor, self.splits["test"], self.cfg["test"],
                                               self.cfg["train"]["car_thresholds"])
            results["test"]["routed"] = dict(zip(self.names, predictor.routed.tolist()))
        with atomic_path(self.root / "router_results.json") as tmp:
            tmp.write_text(metrics_json(results))
        return results

    def run(self, resume: bool = True) -> dict:
        """Every step not finished yet; returns the test metrics of M_O, O-P and the student."""
        self._partitions()  # an empty partition is refused before M_O trains
        for step in STEPS:
            if self.done(step):
                continue
            if step in ("partition", "router"):
                getattr(self, step)()
            else:
                getattr(self, step)(resume)
        summary = {}
        for name, path in (("original", self.step_dir("original") / "results.json"),
                           ("student", self.step_dir("distill") / "results.json"),
                           ("o-p", self.root / "router_results.json")):
            summary[name] = json.loads(path.read_text()).get("test")
        return summary
