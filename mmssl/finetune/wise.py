"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of a zero-shot and a fine-tuned model.

    theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned

over every floating-point tensor of the dual encoder and the class head (the zero-shot model's
head is its zero-shot classifier, which `mmssl finetune` keeps in the checkpoint as
`heads["zeroshot_classifier"]`). alpha = 0 and 1 return the two inputs' tensors bit for bit;
integer buffers come from the fine-tuned model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmssl.errors import UserError

from mmssl.finetune.objective import HEAD, ZEROSHOT_HEAD


def interpolate(zeroshot: dict, finetuned: dict, alpha: float) -> dict:
    """theta(alpha) of two state dicts with the same keys and shapes."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    if zeroshot.keys() != finetuned.keys():
        missing = sorted(set(zeroshot) ^ set(finetuned))[:3]
        raise UserError(f"the two models differ in their parameters ({', '.join(missing)} ...): "
                        f"interpolate a fine-tuned model with the checkpoint it was fine-tuned from")
    mixed = {}
    for key, tuned in finetuned.items():
        start = zeroshot[key]
        if start.shape != tuned.shape:
            raise UserError(f"{key}: shape {tuple(start.shape)} vs {tuple(tuned.shape)}; the two models differ")
        if alpha == 0.0 and tuned.is_floating_point():
            mixed[key] = start.clone()
        elif alpha == 1.0 or not tuned.is_floating_point():
            mixed[key] = tuned.clone()
        else:
            mixed[key] = torch.lerp(start.to(tuned.dtype), tuned, alpha)
    return mixed


def wise_payload(zeroshot_model: dict, finetuned: dict, alpha: float) -> dict:
    """An mmssl checkpoint dict at alpha from a zero-shot model's state dict and a fine-tuned
    checkpoint (`mmssl finetune`'s, which holds both class heads)."""
    heads = finetuned.get("heads") if isinstance(finetuned.get("heads"), dict) else {}
    if HEAD not in heads or ZEROSHOT_HEAD not in heads:
        raise UserError("the fine-tuned checkpoint has no class heads: give a checkpoint mmssl finetune wrote")
    head = interpolate(heads[ZEROSHOT_HEAD], heads[HEAD], alpha)
    return {"model": interpolate(zeroshot_model, finetuned["model"], alpha),
            "heads": {HEAD: head, ZEROSHOT_HEAD: heads[ZEROSHOT_HEAD]},
            "config": finetuned["config"], "step": finetuned.get("step", 0), "wise_alpha": alpha}


def write_wise(zeroshot_checkpoint: str, finetuned_checkpoint: str, alpha: float, out: str | Path) -> Path:
    """`mmssl wise`: read both checkpoints, write theta(alpha) to `out` atomically."""
    from mmssl.models.refs import checkpoint_ref, read_checkpoint
    from mmssl.train.checkpoint import write_torch_file

    import mmssl

    ref = checkpoint_ref(finetuned_checkpoint)
    if not ref.is_checkpoint:
        raise UserError(f"{finetuned_checkpoint}: give the checkpoint mmssl finetune wrote")
    finetuned = read_checkpoint(ref.path)
    zeroshot = mmssl.create_model(zeroshot_checkpoint).state_dict()   # an mmssl checkpoint or openclip:NAME:WEIGHTS
    return write_torch_file(Path(out), wise_payload(zeroshot, finetuned, alpha))
