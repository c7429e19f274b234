"""Model size figures, counted the way the papers' tables count them."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# FlopCounterMode knows the CUDA attention kernels but not the one scaled_dot_product_attention runs on
# CPU, so without this the attention products of transformer backbones (timm MiT/PVT) count as zero.
def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def count_params(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Parameters of ``model``, leaving out those whose name starts with one of ``exclude_prefixes``
    (training-only parts such as auxiliary heads)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(tuple(exclude_prefixes)))


@torch.no_grad()
def count_gflops(model: nn.Module, size: int = 256, in_chans: int = 3) -> float:
    """GFLOPs of one eval-mode forward on a ``1 x in_chans x size x size`` pair, as multiply-adds:
    ``FlopCounterMode`` counts a multiply-add as 2 FLOPs, published tables count it as 1."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pre = torch.rand(1, in_chans, size, size, device=device)
    post = torch.rand(1, in_chans, size, size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    try:
        with counter:
            model(pre, post)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
