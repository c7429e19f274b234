"""The iteration-based training loop: one run of one config, from weights to a model package.

A run writes into ``work_dir``: ``config.yaml`` (the resolved config), ``train_log.csv`` (loss terms and
learning rate every ``log_interval`` iterations), ``val_log.csv`` (validation metrics), ``last.pt`` (the
checkpoint ``--resume`` continues from: model, optimiser, AMP scaler, every process's RNG states,
iteration, best score, the best package as it was then, and the config it fits; written atomically),
``best.safetensors`` (the best-mIoU weights as a model package whose manifest records the config, the data, the
method and the metrics) and, when the run is complete, ``results.json`` (best validation and test metrics; test
with TTA as configured). A run holds ``work_dir`` (process 0 locks it) from start to end: a second run into it
is refused.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (DDP; NCCL on CUDA, gloo on CPU):
each process takes its slice of every global batch of the stream (see :mod:`geochange.trainer.data`), so
the loss curve is that of one process with the same global batch, up to floating-point order, where
the loss is a mean over equally many pixels per process (BatchNorm in training mode sees per-process
batches unless ``sync_bn``, which needs CUDA; OHEM ranks pixels per process). Validation, checkpoints
and packages are written by process 0.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from geochange.engine import models
from geochange.engine.atomic import atomic_path, folder_lock, remove_quietly, temporaries
from geochange.engine.checkpoints import load_tensors
from geochange.engine.errors import CheckpointError, GeoChangeError, output_error
from geochange.engine.hardware import cpu_bf16, cpu_name
from geochange.engine.manifest import make_manifest
from geochange.engine.metrics import metrics_json
from geochange.engine.package import load_package, save_package
from geochange.engine.predictor import resolve_device
from geochange.trainer.augment import Augment
from geochange.trainer.config import ConfigError, model_inputs
from geochange.trainer.data import SPLITS, TrainStream, build_splits, train_loader, worker_error
from geochange.trainer.evaluation import evaluate_items, predictor_for, test_predictions, test_predictor, whole_image
from geochange.trainer.losses import distillation_logits, distillation_loss, simulate_sar_speckle, training_losses
from geochange.trainer.optim import build_optimizer, set_learning_rate, unmatched_multipliers


# --- Processes -----------------------------------------------------------------------------------

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        # The other processes wait at a barrier while the first validates and tests alone (a large test split
        # with TTA takes hours): NCCL's default of 10 minutes would end the run there, and every resume with it.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=12))
    if use_cuda:
        torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device("cuda", local)
    return dist.get_rank(), world, torch.device("cpu")


def _mean_over_processes(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    stacked = torch.stack([v.detach().float() for v in values.values()])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(values, stacked.tolist()))


# --- Model ---------------------------------------------------------------------------------------

def build_model(cfg: dict) -> torch.nn.Module:
    """The configured architecture, seeded, with its initial weights (a package or backbone weights)."""
    m = cfg["model"]
    torch.manual_seed(cfg["seed"])
    model = models.create(m["architecture"], **m["kwargs"])
    if m["init"]:
        package = load_package(m["init"])
        if package.manifest["architecture"] != m["architecture"]:
            raise ConfigError(f"model.init: {m['init']} holds {package.manifest['architecture']}, "
                              f"not {m['architecture']}")
        model.load_state_dict(package.model.state_dict())
    elif m["backbone_weights"]:
        load_backbone(model, m["architecture"], Path(m["backbone_weights"]))
    return model


def load_backbone(model: torch.nn.Module, architecture: str, path: Path) -> None:
    """``model.backbone_weights`` into the model, or one line naming the key and what is wrong."""
    if not hasattr(model, "load_backbone_weights"):
        raise ConfigError(f"model.backbone_weights: {architecture} takes no backbone weights")
    if not path.is_file():
        raise ConfigError(f"model.backbone_weights: {path}: no such file (weights are never downloaded: "
                          "give a local file, or null to start from random weights)")
    try:
        model.load_backbone_weights(path)
    except CheckpointError as e:  # not a checkpoint, or keys and shapes that do not fit: the file named once
        raise ConfigError(f"model.backbone_weights: {e}") from None


def recipe() -> dict:
    """How this run was started, recorded in its package: the command line and the code's commit
    (``-dirty`` where the working tree differed from it; None outside a git checkout)."""
    try:
        described = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "describe", "--always",
                                    "--dirty", "--abbrev=40"], capture_output=True, text=True, timeout=30)
        commit = described.stdout.strip() if described.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"command": shlex.join(sys.argv), "commit": commit}


# --- Logs ----------------------------------------------------------------------------------------

VAL_COLUMNS = ("mIoU", "mF1", "f1", "iou", "precision", "recall", "oa")


class MetricLog:
    """CSV logs (and TensorBoard when the package is importable) of one run; process 0 only."""

    def __init__(self, work_dir: Path, enabled: bool, resume_iteration: int | None, tensorboard: bool):
        self.enabled = enabled
        self.paths = {"train": work_dir / "train_log.csv", "val": work_dir / "val_log.csv"}
        self.writer = None
        if not enabled:
            return
        for path in self.paths.values():
            if resume_iteration is None:
                path.unlink(missing_ok=True)
            elif path.exists():  # rows past the checkpoint are redone by the resumed run
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                # a row cut short (a killed run, a full disk) is dropped; the resumed run writes it again
                keep = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and int(r[0]) <= resume_iteration]
                with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:  # a full disk keeps the old log
                    csv.writer(f).writerows(keep)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(work_dir / "tensorboard"))

    def _append(self, which: str, row: dict) -> None:
        path = self.paths[which]
        new = not path.exists() or path.stat().st_size == 0
        try:
            with open(path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as error:
            raise output_error(path, error.strerror or str(error)) from None

    def train(self, iteration: int, values: dict) -> None:
        if self.enabled:
            self._append("train", {"iteration": iteration, **values})
            if self.writer:
                for key, value in values.items():
                    self.writer.add_scalar(f"train/{key}", value, iteration)

    def validation(self, iteration: int, summary: dict) -> None:
        if self.enabled:
            row = {"iteration": iteration, **{k: summary["global"][k] for k in VAL_COLUMNS},
                   **{f"{k}_per_image": summary["per_image"][k] for k in ("mIoU", "mF1", "f1")}}
            self._append("val", row)
            if self.writer:
                for key, value in row.items():
                    if key != "iteration":
                        self.writer.add_scalar(f"val/{key}", value, iteration)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# --- Checkpoints ---------------------------------------------------------------------------------

CHECKPOINT_KEYS = {"iteration", "model", "optimizer", "scaler", "rng", "cuda_rng", "best"}
# The optimiser's settings its saved state holds, per parameter group, and puts back when loaded.
OPTIMISER_STATE = ("lr", "weight_decay", "betas", "momentum", "lr_mult", "decay_mult")
# The config keys (dotted; a section stands for all its keys) a resume may change, as they do not change what the
# run learns: its name and where and on which device it runs (as mtkd's records of its steps), how far it goes
# (extending a run), how often it logs, validates and writes checkpoints, its loader's processes (each sample
# draws from its own generator), the test of the finished run's best package (done anew at its end) and the MTKD
# pipeline's settings (merged into each step's config where they matter to it; the pipeline checks its steps
# itself), and the weights the run started from (the checkpoint's replace them all; a moved MTKD work_dir moves
# its distillation's model.init). Any other difference (data, seed, batch, crop, augmentation, loss, optimiser,
# schedule, precision) would make one run of two.
RESUMABLE_CHANGES = ("name", "work_dir", "device", "schedule.iterations", "train.val_interval",
                     "train.checkpoint_interval", "train.log_interval", "train.tensorboard", "data.workers", "test",
                     "mtkd", "model.init", "model.backbone_weights")


def dotted(value, prefix: str = "") -> dict:
    """A config's leaves by their dotted keys, list items by their index (as ``--set`` names them)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    if not items:
        return {prefix: value}
    return {key: leaf for k, v in items for key, leaf in dotted(v, f"{prefix}.{k}" if prefix else str(k)).items()}


def run_config(cfg: dict) -> dict:
    """What a checkpoint records of its run's config: every key but those a resume may change."""
    return {key: value for key, value in dotted(cfg).items()
            if not any(key == kept or key.startswith(kept + ".") for kept in RESUMABLE_CHANGES)}


def checkpoint_mismatch(state: dict, fit: dict, model_state: dict, optimizer: torch.optim.Optimizer) -> str | None:
    """How the checkpoint ``state`` differs from the run it would continue (``fit``: its ``checkpoint_fit``), or
    None. Checkpoints written before ``fit`` was recorded are checked by their tensors and parameter groups."""
    saved = state.get("fit")
    if saved and (saved["architecture"], saved["kwargs"]) != (fit["architecture"], fit["kwargs"]):
        return (f"it is of {saved['architecture']} {saved['kwargs']}, this config's model.architecture and "
                f"model.kwargs are {fit['architecture']} {fit['kwargs']}")
    if saved and saved["optimizer"] != fit["optimizer"]:
        return f"its optimiser is {saved['optimizer']}, optim.name is {fit['optimizer']}"
    changed = [key for key in OPTIMISER_STATE if saved and key in saved.get("optim", {})
               and saved["optim"][key] != fit["optim"][key]]
    if changed:
        return ", ".join(f"its optim.{key} is {saved['optim'][key]}, this config's {fit['optim'][key]}"
                         for key in changed)
    theirs = state["model"]
    differ = {"missing": [k for k in model_state if k not in theirs],
              "not in the model": [k for k in theirs if k not in model_state],
              "of another shape": [k for k in model_state if k in theirs
                                   and getattr(theirs[k], "shape", None) != model_state[k].shape]}
    if any(differ.values()):
        return f"its tensors differ from this config's {fit['architecture']}: " + "; ".join(
            f"{len(keys)} tensors {how} (e.g. {keys[0]})" for how, keys in differ.items() if keys)
    groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
    own = [len(group["params"]) for group in optimizer.param_groups]
    if groups != own:
        return (f"its optimiser's parameter groups hold {groups} parameters, those of this config's optim.lr_mult "
                f"and optim.decay_mult {own}")
    return None


def config_changes(state: dict, fit: dict) -> str | None:
    """The keys of ``fit``'s config (``run_config``) that differ from those the checkpoint ``state`` records, with
    both values, or None. Checkpoints written before the config was recorded are not checked so."""
    theirs, ours = state.get("fit", {}).get("config"), fit["config"]
    if theirs is None:
        return None
    changed = [key for key in {**theirs, **ours} if theirs.get(key, ...) != ours.get(key, ...)]
    if "schedule.warmup" in changed and state["iteration"] >= max(theirs["schedule.warmup"], ours["schedule.warmup"]):
        # Past both warm-ups, it only rescales the decay of what is left, as extending schedule.iterations does
        # (QGIS's dialog makes the warm-up a share of the iterations).
        changed.remove("schedule.warmup")
    if not changed:
        return None
    return ", ".join(f"its {key} is {theirs.get(key, 'unset')}, this config's {ours.get(key, 'unset')}"
                     for key in changed) + " (a run resumes with the config it was started with)"


# --- Trainer -------------------------------------------------------------------------------------

class Trainer:
    """One run of ``cfg``. ``splits`` replaces the configured data (MTKD partitions); ``teacher``, a
    callable ``(pre, post, label) -> teacher logits``, adds MTKD's distillation term with
    ``distill_weight``; ``method`` is recorded in the package (default plain or o2sp from the config)."""

    def __init__(self, cfg: dict, *, splits: dict | None = None, teacher=None, distill_weight: float = 0.0,
                 method: str | None = None):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg["device"])
        self.main = self.rank == 0
        if cfg["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.work_dir = Path(cfg["work_dir"])
        self.splits = splits if splits is not None else build_splits(cfg["data"]["datasets"])
        self.inputs = model_inputs(cfg)
        self.module = build_model(cfg).to(self.device)
        self.model = self.module
        if self.world > 1:
            if cfg["model"]["sync_bn"]:
                if self.device.type != "cuda":
                    raise ConfigError("model.sync_bn: synchronised BatchNorm needs CUDA; on CPU use "
                                      "model.freeze_bn or a batch large enough per process")
                self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
            # Top-k routing leaves unchosen experts without gradient in some iterations.
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.optimizer = build_optimizer(self.module, cfg["optim"])
        if self.main:
            for note in unmatched_multipliers(self.module, cfg["optim"]):
                print(f"{cfg['name']}: {note}", file=sys.stderr)
        self.amp_dtype = self._amp_dtype(cfg["train"]["amp"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.teacher, self.distill_weight = teacher, distill_weight
        self.method = method or ("o2sp" if cfg["loss"]["o2sp"] > 0 else "plain")
        self.stream = TrainStream(self.splits["train"], Augment(cfg["augment"]), self.inputs, cfg["seed"],
                                  cfg["data"]["sar_db"])
        self.iteration = 0
        self.recipe = recipe()
        self.best = {"mIoU": -math.inf, "iteration": None, "val": None}
        # Dropout and drop-path draw from the global generator: one stream per process.
        torch.manual_seed(cfg["seed"] + self.rank)

    def _amp_dtype(self, amp: str):
        """The autocast type: ``auto`` is bf16 on CUDA and on CPUs that compute in bf16 (AMX or
        AVX512-BF16), else fp32; losses, routing and metrics stay fp32 either way."""
        if amp == "auto":
            return torch.bfloat16 if self.device.type == "cuda" or cpu_bf16()[0] else None
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp: fp16 needs CUDA (use bf16 or off on CPU)")
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    @property
    def precision(self) -> dict:
        """How the run computes, recorded in its package: the autocast type, the device and, where
        ``train.amp`` was left to ``auto`` on a CPU, why."""
        out = {"autocast": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype],
               "amp": self.cfg["train"]["amp"],
               "device": cpu_name() if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)}
        if self.device.type == "cpu" and out["amp"] == "auto":
            out["why"] = cpu_bf16()[1]
        return out

    # -- paths and packages --

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "last.pt"

    @property
    def package_path(self) -> Path:
        return self.work_dir / "best.safetensors"

    def manifest(self, metrics: dict) -> dict:
        data = {"datasets": [d.get("name") or Path(d.get("root") or d["pre"]).name
                             for d in self.cfg["data"]["datasets"]],
                **{s: len(self.splits[s]) for s in SPLITS}}
        training = {"method": self.method, "iteration": self.iteration, "data": data,
                    "metrics": metrics, "config": self.cfg, "precision": self.precision, "recipe": self.recipe}
        if self.teacher is not None:
            training["distill_weight"] = self.distill_weight
        # The window it sees in training: detect uses it unless told otherwise.
        return make_manifest(self.cfg["model"]["architecture"], self.cfg["model"]["kwargs"],
                             inputs=self.inputs, tile=self.cfg["augment"]["crop"]["size"],
                             gsd=self.cfg["data"]["gsd"], training=training,
                             source=f"geochange trainer, run {self.cfg['name']}")

    # -- one step --

    def train_mode(self) -> None:
        self.module.train()
        if self.cfg["model"]["freeze_bn"]:
            for layer in self.module.modules():
                if isinstance(layer, _BatchNorm):
                    layer.eval()

    def losses(self, pre: torch.Tensor, post: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch (model in training mode)."""
        if self.cfg["loss"]["o2sp"] > 0:
            seed = np.random.SeedSequence([self.cfg["seed"], self.iteration, self.rank, 2]).generate_state(1)[0]
            generator = torch.Generator(device=pre.device).manual_seed(int(seed))
            output = self.model(pre, post, o2sp=simulate_sar_speckle(pre, generator=generator))
        else:
            output = self.model(pre, post)
        terms = training_losses(output, label, self.cfg["loss"])
        if self.teacher is not None:
            terms["distill"] = distillation_loss(distillation_logits(output), self.teacher(pre, post, label),
                                                 self.distill_weight)
        return terms

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.train_mode()
        pre, post, label = (batch[k].to(self.device, non_blocking=True) for k in ("pre", "post", "label"))
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            terms = self.losses(pre, post, label)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["optim"]["clip_grad"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg["optim"]["clip_grad"])
        self.check_finite(loss, terms)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Stop before the step where the loss or its gradients are not finite: the weights would be NaN from then
        on, and the checkpoints and the package would keep them. A finite loss can have gradients that are not
        (overflowing activations); under fp16 the scaler skips such steps itself, as it should. Under DDP the
        processes decide together (each loss is its own process's), so that none waits for one that stopped."""
        values = {name: value.detach() for name, value in terms.items()}
        finite = torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            values["gradient norm"] = torch.nn.utils.get_total_norm(grads)
            finite &= torch.isfinite(values["gradient norm"])
        if self.world > 1:
            every = finite.to(torch.int32)
            dist.all_reduce(every, op=dist.ReduceOp.MIN)
            finite = every.bool()
        if not finite:
            said = ", ".join(f"{name} {value.item():.4g}" for name, value in values.items())
            raise GeoChangeError(f"iteration {self.iteration + 1}: the loss or its gradients are not finite "
                                 f"({said}): training diverged; lower optim.lr or set optim.clip_grad")

    # -- validation, checkpoints --

    def validate(self, log: MetricLog) -> dict | None:
        summary = None
        if self.main and self.splits["val"]:
            predict = whole_image(predictor_for(self.module, self.manifest({}), self.device,
                                                sar_db=self.cfg["data"]["sar_db"]))
            summary = evaluate_items(predict, self.splits["val"], self.cfg["train"]["car_thresholds"])
            log.validation(self.iteration, summary)
            score = summary["global"]["mIoU"]
            if not math.isnan(score) and score > self.best["mIoU"]:
                self.best = {"mIoU": score, "iteration": self.iteration, "val": summary}
                save_package(self.module, self.manifest({"val": summary}), self.package_path)
            self.train_mode()
        if self.world > 1:
            dist.barrier()
        return summary

    def save_checkpoint(self) -> None:
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.device.type == "cuda" else None)
        states = [rng]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng)
        if self.main:
            state = {"iteration": self.iteration, "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "rng": [s[0] for s in states], "cuda_rng": [s[1] for s in states],
                     "best": {k: self.best[k] for k in ("mIoU", "iteration")}, "fit": self.checkpoint_fit,
                     "best_package": self._package_bytes()}
            with atomic_path(self.checkpoint_path) as tmp:
                try:
                    torch.save(state, tmp)
                except RuntimeError as error:  # torch's writer reports a failed write (a full disk) so, not as OSError
                    raise output_error(self.checkpoint_path, str(error).strip().splitlines()[-1]) from None
        if self.world > 1:
            dist.barrier()

    def _package_bytes(self) -> torch.Tensor | None:
        """The best package as it is now, kept in the checkpoint: a run killed after a validation wrote a new best
        and before the next checkpoint would otherwise resume with a best that its checkpoint knows nothing of."""
        if not self.package_path.is_file():
            return None
        try:
            return torch.frombuffer(bytearray(self.package_path.read_bytes()), dtype=torch.uint8)
        except OSError as error:
            raise output_error(self.package_path, error.strerror or str(error)) from None

    @property
    def checkpoint_fit(self) -> dict:
        """What a checkpoint records of the run that wrote it, for a resume to check that it fits: the model, the
        optimiser with the settings its state holds (loading the state would put its own back silently), and the
        rest of the config (``run_config``)."""
        optim = self.cfg["optim"]
        return {"architecture": self.cfg["model"]["architecture"], "kwargs": self.cfg["model"]["kwargs"],
                "optimizer": optim["name"], "optim": {key: optim[key] for key in OPTIMISER_STATE},
                "config": run_config(self.cfg)}

    def read_checkpoint(self, path: Path) -> dict:
        """``path``'s state, or one line naming ``--resume``, the file and why this run cannot continue from it."""
        if not path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {path}")
        try:
            state = load_tensors(path)
        except CheckpointError as why:
            raise ConfigError(f"--resume: {path} is not a trainer checkpoint ({why})") from None
        missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
        if missing:
            raise ConfigError(f"--resume: {path} is not a trainer checkpoint (it has no {', '.join(sorted(missing))})")
        problem = checkpoint_mismatch(state, self.checkpoint_fit, self.module.state_dict(), self.optimizer)
        total = self.cfg["schedule"]["iterations"]
        if problem is None and state["iteration"] > total:
            problem = f"it is at iteration {state['iteration']}, past schedule.iterations ({total})"
        problem = problem or config_changes(state, self.checkpoint_fit)
        if problem:
            raise ConfigError(f"--resume: {path} does not fit this config: {problem}")
        return state

    def load_checkpoint(self, path: Path) -> None:
        self.restore(self.read_checkpoint(path))

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's ``state`` (``read_checkpoint``)."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty where the checkpoint's run did not scale (no fp16): this one starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best.update(state["best"])
        if len(state["rng"]) == self.world:
            torch.set_rng_state(state["rng"][self.rank])
            if state["cuda_rng"][self.rank] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"][self.rank])

    # -- the run --

    def fit(self, resume: bool | str | Path = False, until: int | None = None, replace: bool = True) -> dict | None:
        """Train until ``schedule.iterations`` (or stop after iteration ``until``, with a checkpoint).
        Returns the results of a complete run, None when stopped early. A fresh run into a ``work_dir`` that
        holds an earlier run replaces it, or with ``replace`` False is refused before anything is removed."""
        if until is not None and until < 1:
            raise ConfigError(f"--until: the iteration to stop after must be at least 1, not {until}")
        state = self.read_checkpoint(self.checkpoint_path if resume is True else Path(resume)) if resume else None
        resumed = state is not None
        if self.main:
            p = self.precision
            print(f"{self.cfg['name']}: {p['autocast']} on {p['device']}" + (f" ({p['why']})" if "why" in p else ""),
                  file=sys.stderr)
        with self.hold_work_dir(resumed, replace) if self.main else contextlib.nullcontext():
            if resumed:
                self.restore(state)
                if self.main:
                    self._put_back_best_package(state)
            del state  # its tensors are not kept through the run
            return self._train(resumed, until)

    @contextlib.contextmanager
    def hold_work_dir(self, resumed: bool, replace: bool):
        """Lock ``work_dir`` for the run (a second run into it is refused) and make it ready: the temporaries of
        a run killed while it wrote removed; a fresh run's earlier outputs removed (only where ``replace``, else
        it is refused), a resumed run's results (written anew at its end)."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise output_error(self.work_dir, error.strerror or str(error)) from None
        outputs = [self.checkpoint_path, self.package_path, self.work_dir / "results.json"]
        with folder_lock(self.work_dir):
            earlier = [path.name for path in outputs if path.exists()]
            if not resumed and earlier and not replace:
                raise ConfigError(f"{self.work_dir}: holds an earlier run ({', '.join(earlier)}); continue it with "
                                  "--resume, replace it with --restart, or choose another work_dir")
            logs = [self.work_dir / name for name in ("config.yaml", "train_log.csv", "val_log.csv")]
            for final in outputs + logs:  # under the lock, no other run is writing them: a dead run's
                for left in temporaries(final):
                    remove_quietly(left)
            try:
                for stale in outputs[2:] if resumed else outputs:
                    stale.unlink(missing_ok=True)
            except OSError as error:
                raise output_error(self.work_dir, error.strerror or str(error)) from None
            with atomic_path(self.work_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.cfg, sort_keys=False))
            yield

    def _put_back_best_package(self, state: dict) -> None:
        """Make the best package the checkpoint's: one written after it (by a validation of a run killed before
        its next checkpoint, or a finished run's test) is not this run's best. Checkpoints from before the package
        was kept in them leave it as it is."""
        if "best_package" not in state:
            return
        kept = state["best_package"]
        if kept is None:
            self.package_path.unlink(missing_ok=True)
            return
        kept = kept.numpy().tobytes()
        if not self.package_path.is_file() or self.package_path.read_bytes() != kept:
            with atomic_path(self.package_path) as tmp:
                tmp.write_bytes(kept)

    def _train(self, resumed: bool, until: int | None) -> dict | None:
        cfg, total = self.cfg, self.cfg["schedule"]["iterations"]
        log = MetricLog(self.work_dir, self.main, self.iteration if resumed else None,
                        cfg["train"]["tensorboard"])
        stop = total if until is None else min(until, total)
        batches = iter(train_loader(self.stream, self.iteration, cfg["data"]["batch"], cfg["data"]["workers"],
                                    self.rank, self.world))
        bar = tqdm(total=total, initial=self.iteration, desc=cfg["name"], disable=None if self.main else True)
        started, done_at_start = time.perf_counter(), self.iteration
        try:
            while self.iteration < stop:
                factor = set_learning_rate(self.optimizer, self.iteration, cfg["schedule"])
                try:
                    batch = next(batches)
                except GeoChangeError as error:  # a bad item found in a loader worker
                    raise worker_error(error) from None
                values = self.train_step(batch)
                self.iteration += 1
                bar.update(1)
                it = self.iteration
                if it % cfg["train"]["log_interval"] == 0 or it == stop:
                    row = _mean_over_processes(values, self.world)
                    seconds = (time.perf_counter() - started) / (it - done_at_start)
                    log.train(it, {"lr": cfg["optim"]["lr"] * factor, **row, "seconds_per_iter": seconds})
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                if it % cfg["train"]["val_interval"] == 0 or it == total:
                    self.validate(log)
                if it % cfg["train"]["checkpoint_interval"] == 0 or it == stop:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
            del batches
        return self.finish() if self.iteration == total else None

    def finish(self) -> dict:
        """Export (the model as it ends where no validation picks the best), test the best weights, write
        ``results.json``."""
        results = None
        if self.main:
            if not self.splits["val"] or not self.package_path.exists():
                save_package(self.module, self.manifest({}), self.package_path)
            package = load_package(self.package_path, self.device)
            results = {"best_iteration": self.best["iteration"],
                       "val": package.manifest["training"]["metrics"].get("val"), "test": None}
            if self.splits["test"]:
                predictor = test_predictor(package, self.device, self.cfg["test"], self.cfg["data"]["sar_db"])
                results["test"] = test_predictions(predictor, self.splits["test"], self.cfg["test"],
                                                   self.cfg["train"]["car_thresholds"])
                manifest = package.manifest
                manifest["training"]["metrics"]["test"] = results["test"]
                save_package(package.model, manifest, self.package_path)
            with atomic_path(self.work_dir / "results.json") as tmp:
                tmp.write_text(metrics_json(results))
        if self.world > 1:
            dist.barrier()
        return results
