"""Small training configs on the shared real data, for the trainer's tests."""
from __future__ import annotations

from geochange.trainer.config import deep_merge, validate


def small_config(work_dir, data_root, architecture: str = "tinycd", **sections) -> dict:
    """2 iterations, batch 2, 72 px crops (the smallest a package's tile may be that TinyCD trains on), no TTA;
    ``sections`` are merged over it."""
    raw = {
        "name": "test", "work_dir": str(work_dir),
        "model": {"architecture": architecture},
        "data": {"datasets": [{"root": str(data_root), "split": {"val": 0.1, "test": 0.1, "seed": 0}}],
                 "batch": 2, "workers": 0},
        "augment": {"crop": {"size": 72}},
        "schedule": {"iterations": 2, "warmup": 1},
        "train": {"val_interval": 2, "log_interval": 1, "tensorboard": False},
        "test": {"tta": False},
    }
    return validate(deep_merge(raw, sections))


def first_batch(trainer, iteration: int = 0) -> tuple:
    """The (pre, post, label) batch of ``iteration`` of a trainer's stream."""
    from geochange.trainer.data import train_loader

    batch = next(iter(train_loader(trainer.stream, iteration, trainer.cfg["data"]["batch"], 0)))
    return batch["pre"], batch["post"], batch["label"]


def gradients(trainer, batch) -> dict:
    """Gradients of the summed loss terms of ``batch`` for every trainable parameter (zeros if unused)."""
    import torch

    trainer.train_mode()
    trainer.module.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout / drop-path / gate noise alike in runs that are compared
    sum(trainer.losses(*batch).values()).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in trainer.module.named_parameters()}
