"""MoCo v2 (Chen et al. 2020) on the image tower: an online query encoder, a momentum key encoder
and a queue of keys, for `loss.kind=moco` (image-only training, like `loss.kind=simclr`).

The query encoder is the image tower plus the projection MLP SimCLR uses here
(`mmssl.heads.simclr.SimCLRHead`, sized by `heads.simclr`), so the two methods differ only in
where their negatives come from: SimCLR's are the batch's other views, MoCo's the queue. The key
encoder is a momentum copy of both (`mmssl.heads.momentum.MomentumTowers`, image queue only),
updated by EMA once per step before any key is computed. View 1 makes the queries, view 2 the
keys (MoCo v2's asymmetric loss). Defaults: a 65536-key queue, momentum 0.999, temperature 0.2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.heads.momentum import MOCO_QUEUE_SIZE, MomentumTowers, momentum_of
from mmssl.heads.simclr import SimCLRHead


class MoCoHead(nn.Module):
    def __init__(self, model: nn.Module, simclr_cfg, loss_cfg):
        super().__init__()
        self.projection = SimCLRHead(model, simclr_cfg)
        self.temperature = loss_cfg.moco_temperature
        out_dim = self.projection.mlp[-1].out_features
        self.momentum = MomentumTowers(self._online(model), loss_cfg.queue_size or MOCO_QUEUE_SIZE,
                                       momentum_of(loss_cfg), out_dim, text=False)

    def _online(self, model: nn.Module) -> nn.ModuleDict:
        """The query encoder's modules under the names the momentum copy uses (not registered here:
        the image tower belongs to the model)."""
        return nn.ModuleDict({"visual": model.visual, "projection": self.projection})

    def momentum_update(self, model: nn.Module) -> None:
        self.momentum.update(self._online(model))

    def queries_and_keys(self, model: nn.Module, views: torch.Tensor) -> dict:
        """{"moco_q": projections of view 1 (with gradient), "moco_k": normalised momentum keys of view 2}."""
        queries = self.projection(model, views[0])
        with torch.no_grad():
            keys = F.normalize(self.momentum.model.projection(self.momentum.model, views[1]), dim=-1)
        return {"moco_q": queries, "moco_k": keys}

