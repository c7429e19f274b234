"""MTKD (the JL1-CD paper): CAR partitions, the original model M_O, one teacher per partition, the
distilled student, and the router package for O-P inference.

Steps (``geochange mtkd <step> CONFIG``; ``run`` does all and skips finished ones), each in a folder of
the config's ``work_dir``:

* ``partition`` -> ``partitions.json``: the training and validation items per CAR partition. With
  thresholds ``t1 < t2`` a sample with ground-truth CAR < t1 is small, < t2 medium, else large (one
  threshold: small / large). The same strict rule picks the teacher of a sample during distillation.
* ``original`` -> ``original/``: M_O, the config trained on all data.
* ``teachers`` -> ``teacher_<name>/``: the config (with ``mtkd.teachers`` merged over it) trained on one
  partition from the same initialisation as M_O (same seed, same initial weights), validated on the
  validation items of that partition (all of them if it has none).
* ``distill`` -> ``student/``: the config with ``mtkd.distill`` merged over it, initialised from M_O's
  best weights; loss = task loss + lambda x MSE(student logits, teacher logits), the teacher of each
  sample chosen by its CAR after augmentation; teachers frozen, in eval mode, without gradients.
  ``mtkd.lambda`` defaults to the authors' value for the architecture.
* ``router`` -> ``router.safetensors`` and ``router_results.json`` (O-P metrics on the test split).

The router package is the engine's (``engine.router``: M_O and the teachers in one ``.safetensors`` file,
routed at inference by M_O's predicted CAR with <=, as the authors' test code does); ``geochange detect``
runs it like any model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from geochange.engine.atomic import atomic_path
from geochange.engine.package import load_package
from geochange.engine.predict import Predictor
from geochange.engine.router import RouterPredictor, load_router, route, save_router
from geochange.trainer.config import ConfigError, derive
from geochange.trainer.data import build_splits, change_area_ratio
from geochange.trainer.evaluation import evaluate_items, whole_image, with_tta
from geochange.trainer.losses import teacher_logits
from geochange.trainer.loop import Trainer

STEPS = ("partition", "original", "teachers", "distill", "router")
# lambda of the distillation term in the authors' code (methods.md); Changer-MiT-b1 from JL1-CD Table II.
DEFAULT_LAMBDA = {"changer_mit_b0": 1e-4, "changer_mit_b1": 1e-3, "tinycd": 5e-3}


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
        which = route(change_area_ratio(label), self.thresholds)
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

    def done(self, step: str) -> bool:
        if step == "partition":
            return (self.root / "partitions.json").is_file()
        if step == "teachers":
            return all((self.step_dir("teacher", n) / "results.json").is_file() for n in self.names)
        if step == "router":
            return (self.root / "router.safetensors").is_file()
        return (self.step_dir(step) / "results.json").is_file()

    def partition(self) -> dict:
        out = {"thresholds": self.thresholds,
               "rule": "small if CAR < t1, medium if CAR < t2, else large (CAR over labelled pixels)"}
        for split in ("train", "val"):
            groups = {name: [] for name in self.names}
            for item in self.splits[split]:
                car = change_area_ratio(item.load()[2])
                groups[self.names[int(route(car, self.thresholds))]].append(item.id)
            out[split] = groups
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "partitions.json") as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        return out

    def _partitions(self) -> dict:
        if not self.done("partition"):
            self.partition()
        return json.loads((self.root / "partitions.json").read_text())

    def _train(self, cfg: dict, resume: bool, **options) -> dict | None:
        trainer = Trainer(cfg, **options)
        return trainer.fit(resume=resume and trainer.checkpoint_path.is_file())

    def original(self, resume: bool = True):
        cfg = derive(self.cfg, {"work_dir": str(self.step_dir("original"))})
        return self._train(cfg, resume, splits=self.splits, method="mtkd-original")

    def teachers(self, resume: bool = True):
        parts = self._partitions()
        for name in self.names:
            if (self.step_dir("teacher", name) / "results.json").is_file():
                continue
            chosen = {s: set(parts[s][name]) for s in ("train", "val")}
            splits = {"train": [i for i in self.splits["train"] if i.id in chosen["train"]],
                      "val": [i for i in self.splits["val"] if i.id in chosen["val"]] or self.splits["val"],
                      "test": []}
            if not splits["train"]:
                raise ConfigError(f"mtkd: the {name} partition has no training sample; change mtkd.thresholds")
            cfg = derive(self.cfg, {**self.cfg["mtkd"]["teachers"],
                                    "work_dir": str(self.step_dir("teacher", name))})
            self._train(cfg, resume, splits=splits, method=f"mtkd-teacher-{name}")

    def distill_weight(self) -> float:
        arch = self.cfg["model"]["architecture"]
        weight = self.cfg["mtkd"]["lambda"]
        if weight is None:
            if arch not in DEFAULT_LAMBDA:
                raise ConfigError(f"mtkd.lambda: no default for {arch}; set it")
            weight = DEFAULT_LAMBDA[arch]
        return float(weight)

    def distill_trainer(self) -> Trainer:
        """The student's run: initialised from M_O's best weights, the teachers behind a router."""
        original = self.step_dir("original") / "best.safetensors"
        teachers = [load_package(self.step_dir("teacher", n) / "best.safetensors").model for n in self.names]
        cfg = derive(self.cfg, {**self.cfg["mtkd"]["distill"], "work_dir": str(self.step_dir("distill")),
                                "model": {"init": str(original), "backbone_weights": None}})
        return Trainer(cfg, splits=self.splits, teacher=TeacherRouter(teachers, self.thresholds),
                       distill_weight=self.distill_weight(), method="mtkd")

    def distill(self, resume: bool = True):
        trainer = self.distill_trainer()
        return trainer.fit(resume=resume and trainer.checkpoint_path.is_file())

    def router(self) -> dict:
        """Write the O-P router package; its metrics on the test split (TTA as configured)."""
        members = {"original": self.step_dir("original") / "best.safetensors",
                   **{n: self.step_dir("teacher", n) / "best.safetensors" for n in self.names}}
        path = save_router(self.root / "router.safetensors", members["original"],
                           [(n, members[n]) for n in self.names], self.thresholds)
        results = {"router": str(path), "test": None}
        if self.splits["test"]:
            predictor = RouterPredictor(load_router(path), lambda package: Predictor(package, self.cfg["device"]))
            t = self.cfg["test"]
            predict = with_tta(predictor, t["scales"], t["flip"]) if t["tta"] else whole_image(predictor)
            results["test"] = evaluate_items(predict, self.splits["test"], self.cfg["train"]["car_thresholds"])
            results["test"]["routed"] = dict(zip(self.names, predictor.routed.tolist()))
        with atomic_path(self.root / "router_results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        return results

    def run(self, resume: bool = True) -> dict:
        """Every step not finished yet; returns the test metrics of M_O, O-P and the student."""
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
