"""Can an image tower learn the synthetic world's 48 colour+shape labels in N steps *supervised*?

Why: the tiny ViT's zero-shot learning check stalls at ~0.36 top-1 after 300 contrastive steps.
Training the same open_clip image tower with cross-entropy on the labels (same AdamW, warmup-cosine,
batch 128, bf16 autocast) bounds what the architecture can learn in that many samples, without the
text tower or the contrastive loss in the way; it is also ~3x cheaper, so variants are quick to try.

usage: python bench/vit_shape_proxy.py MODEL_JSON LR STEPS [vision_cfg_key=json_value ...]
e.g.   python bench/vit_shape_proxy.py configs/models/tiny-vit-64.json 5e-4 300 patch_size=4
       PROXY_OPTIMIZER=muon python bench/vit_shape_proxy.py configs/models/tiny-vit-64.json 5e-4 300
The optimizer and schedule are mmssl's own (`mmssl.train.optim`, tiny.yaml's betas/eps/decay);
PROXY_OPTIMIZER picks adamw (default) or muon (block matrices at muon_lr 0.02).
Prints top-1 (all 48 labels / shape only) on 2,000 held-out scenes every 50 steps.
Renders 42,000 one-object scenes once into bench/results/vit_shape_proxy.npz.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/eval.py shadows eval
sys.path.insert(0, str(REPO))
CACHE = REPO / "bench" / "results" / "vit_shape_proxy.npz"
TRAIN, TEST, BATCH = 40000, 2000, 128
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised one-object scenes (the val split's renderer, its own seed) and their labels."""
    from data_prep.synthetic import SceneRenderer

    if not CACHE.exists():
        render = SceneRenderer("val", 123, 64)
        samples = [render(i, None) for i in range(TRAIN + TEST)]
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(s.jpg)).convert("RGB")) for s in samples])
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        np.savez(CACHE, x=pixels, y=np.array([s.meta["label"] for s in samples]))
    data = np.load(CACHE)
    images = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float().div(255)
    return (images - MEAN) / STD, torch.from_numpy(data["y"]).long()


def build(model_json: str, overrides: list) -> torch.nn.Module:
    from open_clip.model import _build_vision_tower

    cfg = json.loads(Path(model_json).read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        cfg["vision_cfg"][key] = json.loads(value)
    torch.manual_seed(0)
    return torch.nn.Sequential(_build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]), torch.nn.Linear(cfg["embed_dim"], 48))


def accuracy(model, images, labels) -> tuple[float, float]:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    model.train()
    return (pred == labels).float().mean().item(), (pred % 6 == labels % 6).float().mean().item()


def main() -> None:
    model_json, lr, steps, overrides = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    images, labels = scenes()
    from mmssl.config import load_config
    from mmssl.train.optim import build_optimizer, build_scheduler

    model = build(model_json, overrides)
    train_cfg = load_config("tiny", [f"train.lr={lr}", f"train.steps={steps}", "train.warmup=30",
                                     f"train.optimizer={os.environ.get('PROXY_OPTIMIZER', 'adamw')}"]).train
    opt = build_optimizer(model, train_cfg)
    sched = build_scheduler(opt, train_cfg)
    rng, started, curve = torch.Generator().manual_seed(0), time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, TRAIN, (BATCH,), generator=rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images[idx]).float(), labels[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            top1, shape = accuracy(model, images[TRAIN:], labels[TRAIN:])
            curve.append(f"{step}:{top1:.2f}/{shape:.2f}")
    print(train_cfg.optimizer, " ".join(sys.argv[1:]), "|", " ".join(curve), f"| {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
