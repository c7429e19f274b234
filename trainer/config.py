"""Training configurations: one YAML file per experiment, merged over defaults and validated on load.

A config is a nested dict. Every key the trainer knows is in :data:`SCHEMA` with its type and default;
an unknown key, a wrong type or an impossible value is reported with the key's dotted path (and the
closest known name for a typo) before anything is built. ``--set data.batch=4`` style overrides
(values parsed as YAML; list items addressed by index, ``data.datasets.0.root=...``) are applied
before validation.

Sections: ``model`` (architecture, constructor arguments, initial weights), ``data`` (datasets and
loader, see :mod:`geochange.trainer.data`), ``augment`` (:mod:`~geochange.trainer.augment`),
``loss`` (:mod:`~geochange.trainer.losses`), ``optim`` and ``schedule`` (:mod:`~geochange.trainer.optim`),
``train`` (loop, validation, checkpoints, logging), ``test`` (TTA) and, for the MTKD pipeline, ``mtkd``
(:mod:`~geochange.trainer.mtkd`).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
from pathlib import Path

import yaml

from geochange.engine.errors import GeoChangeError
from geochange.engine.options import spec as detect_option


class ConfigError(GeoChangeError, ValueError):
    """A configuration that cannot be used; the message names the key and says why."""


REQUIRED = object()


def _finite(v):
    # YAML reads .inf and .nan as floats: an infinite learning rate or weight decay trains on NaN from the first step.
    # (An int of any size is finite; one past a float's range would not convert.)
    return None if not isinstance(v, float) or math.isfinite(v) else "must be a finite number"


def _positive(v):
    return _finite(v) or (None if v > 0 else "must be positive")


def _non_negative(v):
    return _finite(v) or (None if v >= 0 else "must be >= 0")


def default_loader_workers() -> int:
    """Data-loader workers where the config gives none: 4, or the cores this process may use besides its own where
    fewer (more would take the training's cores; torch warns that the loader may then run slow or freeze). The
    cores as Dask counts them (the CPU affinity, a container's quota), as detect-many does. The samples do not
    depend on it: each is augmented with a generator of its own (``trainer.data``)."""
    from dask import system

    return max(0, min(4, system.CPU_COUNT - 1))


# The crop is recorded as the package's tile, which detect's default overlap must stay under.
MIN_CROP = detect_option("overlap").default + 1
# Architectures whose training forward needs sides divisible by more than 1 (detect pads its windows itself):
# TinyCD multiplies its 1/4 masks by its upsampled 1/8 features.
CROP_MULTIPLE = {"tinycd": 8}


def _crop(v):
    return None if v >= MIN_CROP else (f"must be at least {MIN_CROP}: it becomes the package's tile, which detect's "
                                       f"default overlap ({MIN_CROP - 1} px) must stay under")


def _probability(v):
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def _betas(v):
    ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, NUM) and not isinstance(x, bool) and 0 <= x < 1
                                                     for x in v)
    return None if ok else "must be [beta1, beta2], each in [0, 1)"


def _one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}"
    return check


def _pair_of_numbers(v):
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
    return None if ok and v[0] <= v[1] else "must be [low, high] with low <= high"


def _blur_kernels(v):
    from geochange.trainer.augment import BLUR_KERNELS

    ok = isinstance(v, list) and v and all(isinstance(k, int) and k in BLUR_KERNELS for k in v)
    return None if ok else f"must be a non-empty list of kernel sizes among {sorted(BLUR_KERNELS)}"


def _thresholds(v):
    ok = (isinstance(v, list) and v and all(isinstance(x, (int, float)) and 0 < x < 1 for x in v)
          and list(v) == sorted(set(v)))
    return None if ok else "must be a non-empty ascending list of CAR thresholds in (0, 1)"


def _tta_scales(v):
    ok = isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 4
                                           for x in v)
    return None if ok else "must be a non-empty list of scales in (0, 4]"


def _ohem(v):
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != {"thresh", "min_kept"}:
        return "must be null or {thresh: float, min_kept: int}"
    return None if 0 < v["thresh"] <= 1 and v["min_kept"] >= 1 else "thresh in (0, 1], min_kept >= 1"


# Leaves: (type or tuple of types, default, optional check). Nested dicts are sections.
NUM = (int, float)
SCHEMA: dict = {
    "name": (str, REQUIRED),
    "seed": (int, 0, _non_negative),
    "work_dir": ((str, type(None)), None),  # default: runs/<name>
    "device": (str, "auto"),
    "deterministic": (bool, False),
    "model": {
        "architecture": (str, REQUIRED),
        "kwargs": (dict, {}),
        # A model package (.safetensors) whose weights start the run, e.g. the MoE run before O2SP.
        "init": ((str, type(None)), None),
        # Local ImageNet weights for the backbone (the model's load_backbone_weights); nothing is downloaded.
        "backbone_weights": ((str, type(None)), None),
        # BatchNorm layers normalise with (and keep) their running statistics: small batches, fine-tuning.
        "freeze_bn": (bool, False),
        "sync_bn": (bool, False),
    },
    "data": {
        "datasets": (list, REQUIRED),
        # Input spec per date ({"pre": {...}, "post": {...}}, see engine.inputs); default: the architecture's.
        "inputs": ((dict, type(None)), None),
        "batch": (int, 8, _positive),  # global batch, split over the processes
        "workers": (int, default_loader_workers(), _non_negative),
        "optical_sar": (bool, False),  # forbids the exchange of dates
        # Float SAR dates hold dB (else linear power), as detect's --sar-db says of the rasters it is given.
        "sar_db": (bool, False),
        # Metres per pixel of the training imagery, recorded in the package: detect warns on other scales.
        "gsd": ((int, float, type(None)), None, lambda v: None if v is None or v > 0 else "must be positive"),
    },
    "augment": {
        # padding: what fills the corners, 0 in the images and ignored in the label (Open-CD), or the
        # pair and label reflected about their edges (albumentations' Rotate, as TinyCD's authors train).
        "rotate": {"prob": (NUM, 0.5, _probability), "degrees": (NUM, 180, _non_negative),
                   "padding": (str, "constant", _one_of("constant", "reflect"))},
        # Open-CD's RandomRotFlip: when no rotation happened, rot90 x k plus a flip with this probability.
        "rot_flip": (NUM, 0.0, _probability),
        # any: albumentations' Flip (TinyCD): with this probability a vertical, horizontal or double flip.
        "flip": {"horizontal": (NUM, 0.5, _probability), "vertical": (NUM, 0.5, _probability),
                 "any": (NUM, 0.0, _probability)},
        "crop": {"size": (int, 256, _crop), "cat_max_ratio": (NUM, 0.75, _probability)},
        "exchange": (NUM, 0.0, _probability),
        "photometric": {
            "prob": (NUM, 0.5, _probability),
            "brightness": (NUM, 10, _non_negative),
            "contrast": (list, [0.8, 1.2], _pair_of_numbers),
            "saturation": (list, [0.8, 1.2], _pair_of_numbers),
            "hue": (NUM, 10, _non_negative),
        },
        # TinyCD's changes of each date (albumentations' RandomBrightnessContrast, then GaussianBlur).
        "brightness_contrast": {"prob": (NUM, 0.0, _probability), "brightness": (NUM, 0.2, _non_negative),
                                "contrast": (NUM, 0.2, _non_negative)},
        "blur": {"prob": (NUM, 0.0, _probability), "kernels": (list, [3, 5], _blur_kernels)},
    },
    "loss": {
        "ohem": ((dict, type(None)), {"thresh": 0.7, "min_kept": 100000}, _ohem),
        "aux_weight": (NUM, 0.5, _non_negative),  # each auxiliary head (SSCFNet multi-loss)
        "gate_weight": (NUM, 1.0, _non_negative),  # MoE load balancing (M2CD)
        "o2sp": (NUM, 0.0, _non_negative),  # O2SP self-distillation weight; 0 = no O2SP path
    },
    "optim": {
        "name": (str, "adamw", _one_of("adamw", "sgd")),
        "lr": (NUM, 1e-4, _positive),
        "weight_decay": (NUM, 0.01, _non_negative),
        "betas": (list, [0.9, 0.999], _betas),
        "momentum": (NUM, 0.9, _non_negative),
        # Open-CD paramwise_cfg: the longest key contained in a parameter's name decides its multipliers.
        "lr_mult": (dict, {}),
        "decay_mult": (dict, {}),
        "clip_grad": ((int, float, type(None)), None, _positive),  # null: no clipping
    },
    "schedule": {
        "iterations": (int, 200000, _positive),
        "warmup": (int, 1000, _non_negative),
        "warmup_start": (NUM, 1e-6, _probability),
        "decay": (str, "poly", _one_of("poly", "cosine", "constant")),
        "power": (NUM, 1.0, _positive),
    },
    "train": {
        "val_interval": (int, 1000, _positive),
        "checkpoint_interval": ((int, type(None)), None, _positive),  # default: val_interval
        "log_interval": (int, 50, _positive),
        "amp": (str, "auto", _one_of("auto", "off", "bf16", "fp16")),
        "car_thresholds": (list, [0.05, 0.2], _thresholds),  # bins of the per-CAR validation table
        "tensorboard": (bool, True),  # used only if the tensorboard package is importable
    },
    "test": {
        "tta": (bool, True),
        "scales": (list, [0.75, 1.0, 1.25], _tta_scales),
        "flip": (bool, True),
    },
}

MTKD_SCHEMA: dict = {
    "thresholds": (list, [0.05, 0.2], _thresholds),
    # Partial configs merged over the base config for the teachers' and the student's runs.
    "teachers": (dict, {}),
    "distill": (dict, {}),
    # Weight of the distillation MSE; default: the architecture's value from the authors' code.
    "lambda": ((int, float, type(None)), None, lambda v: None if v is None else _non_negative(v)),
}


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _coerce(value, types: tuple):
    """PyYAML reads ``1e-4`` (no dot) as a string and ``2e5`` as a float; accept both where a number is
    expected."""
    if isinstance(value, str) and (float in types or int in types):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and int in types and float not in types and value.is_integer():
        return int(value)
    return value


def _apply_schema(schema: dict, given: dict, path: str, errors: list) -> dict:
    if not isinstance(given, dict):
        errors.append(f"{path.rstrip('.') or 'config'}: must be a mapping, got {type(given).__name__}")
        return {}
    out = {}
    for key in given:
        if key not in schema:
            close = difflib.get_close_matches(str(key), schema, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(schema)}"
            errors.append(f"{path}{key}: unknown key{hint}")
    for key, rule in schema.items():
        where = f"{path}{key}"
        if isinstance(rule, dict):
            out[key] = _apply_schema(rule, given.get(key, {}), where + ".", errors)
            continue
        types, default, *check = rule
        if key not in given:
            if default is REQUIRED:
                errors.append(f"{where}: required")
            out[key] = copy.deepcopy(default)
            continue
        types = types if isinstance(types, tuple) else (types,)
        value = _coerce(given[key], types)
        if value is False and str in types and check and check[0]("off") is None:  # YAML 1.1 reads off as false
            value = "off"
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            names = "/".join(t.__name__ for t in types).replace("NoneType", "null")
            errors.append(f"{where}: expected {names}, got {value!r}")
        elif check and value is not None and (problem := check[0](value)):
            errors.append(f"{where}: {problem} (got {value!r})")
        out[key] = value
    return out


def validate(raw: dict) -> dict:
    """The full config (defaults filled in) of ``raw``; raises :class:`ConfigError` listing every problem."""
    from geochange.trainer.data import dataset_spec_errors

    errors: list[str] = []
    raw = dict(raw)
    mtkd = raw.pop("mtkd", None)
    cfg = _apply_schema(SCHEMA, raw, "", errors)
    if mtkd is not None:
        cfg["mtkd"] = _apply_schema(MTKD_SCHEMA, mtkd, "mtkd.", errors)
    if not errors:
        errors += _model_errors(cfg["model"], cfg["augment"]["crop"]["size"])
        for i, spec in enumerate(cfg["data"]["datasets"]):
            errors += [f"data.datasets.{i}.{problem}" for problem in dataset_spec_errors(spec)]
        if not cfg["data"]["datasets"]:
            errors.append("data.datasets: at least one dataset is needed")
        if cfg["augment"]["exchange"] > 0:
            errors += _exchange_errors(cfg)
        if cfg["schedule"]["warmup"] >= cfg["schedule"]["iterations"]:
            errors.append("schedule.warmup: must be shorter than schedule.iterations")
        for key in ("lr_mult", "decay_mult"):
            if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in cfg["optim"][key].items()):
                errors.append(f"optim.{key}: must map parts of parameter names to numbers")
    if not errors and mtkd is not None:
        for step in ("teachers", "distill"):  # each MTKD step's config must be valid too
            try:
                validate(deep_merge(raw, cfg["mtkd"][step]))
            except ConfigError as e:
                errors += [f"mtkd.{step} makes {line.strip()}" for line in str(e).splitlines()[1:]]
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    if cfg["work_dir"] is None:
        cfg["work_dir"] = str(Path("runs") / cfg["name"])
    if cfg["train"]["checkpoint_interval"] is None:
        cfg["train"]["checkpoint_interval"] = cfg["train"]["val_interval"]
    return cfg


def _model_errors(model: dict, crop: int) -> list[str]:
    """The architecture is registered, takes ``model.kwargs`` and can train on ``crop``."""
    from geochange.engine import models

    arch = model["architecture"]
    try:
        factory = models.spec(arch).factory
    except KeyError as e:
        return [f"model.architecture: {e.args[0]}"]
    errors = []
    try:
        inspect.signature(factory).bind(**model["kwargs"])
    except TypeError as e:
        takes = ", ".join(inspect.signature(factory).parameters) or "none"
        errors.append(f"model.kwargs: {arch}: {e} (its arguments: {takes})")
    multiple = CROP_MULTIPLE.get(arch, 1)
    if crop % multiple:
        errors.append(f"augment.crop.size: {arch} trains on sides divisible by {multiple} (got {crop})")
    return errors


def model_inputs(cfg: dict) -> dict:
    """What each date feeds the model: ``data.inputs``, else the architecture's input spec."""
    from geochange.engine import models

    if cfg["data"]["inputs"]:
        return cfg["data"]["inputs"]
    pre, post = models.spec(cfg["model"]["architecture"]).inputs
    return {"pre": pre, "post": post}


def _exchange_errors(cfg: dict) -> list[str]:
    """Exchanged dates are read with each other's input spec: both must be of one kind (not optical and SAR, the
    same bands, type and scale), whether or not ``data.optical_sar`` says so."""
    if cfg["data"]["optical_sar"]:
        return ["augment.exchange: dates cannot be exchanged in an optical-SAR pair"]
    source = "data.inputs" if cfg["data"]["inputs"] else f"{cfg['model']['architecture']}'s input spec"
    try:
        inputs = model_inputs(cfg)
    except KeyError:  # an unknown architecture: reported by _model_errors
        return []
    pre, post = inputs.get("pre"), inputs.get("post")
    if not (isinstance(pre, dict) and isinstance(post, dict)):
        return []

    def kind(spec):
        return spec.get("bands"), spec.get("modality"), spec.get("dtype", "uint8"), spec.get("scale")

    if kind(pre) == kind(post):
        return []
    pre, post = ("{}-band {} {} (scale {})".format(*kind(spec)) for spec in (pre, post))
    return [f"augment.exchange: the pre date is {pre} and the post date {post}, as {source} says: dates of "
            "different kinds cannot be exchanged; set augment.exchange: 0"]


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. data.batch=4")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), parsed


def apply_override(raw: dict, path: list[str], value) -> None:
    node = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """Read a YAML config, apply ``key=value`` overrides, validate. ``path`` None: no file, the overrides over the
    defaults (they must give the required keys)."""
    raw = {} if path is None else _read(Path(path))
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        return validate(raw)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file in UTF-8 ({e}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return raw


def derive(cfg: dict, update: dict) -> dict:
    """A validated config: ``cfg`` with the partial config ``update`` merged over it. A checkpoint interval that
    followed the validation interval follows ``update``'s (the best weights are kept at checkpoints)."""
    merged = deep_merge(cfg, update)
    train = cfg["train"]
    if "checkpoint_interval" not in update.get("train", {}) and train["checkpoint_interval"] == train["val_interval"]:
        merged["train"]["checkpoint_interval"] = None
    return validate(merged)
