"""A trained head read back from an mmssl checkpoint, for the commands that use one (ITM scoring
and re-ranking, captioning); every other command loads the dual encoder alone."""
from __future__ import annotations

from torch import nn

from mmssl.errors import UserError


def load_head(checkpoint: str, head: str, model: nn.Module) -> nn.Module:
    """The checkpoint's `heads[head]`, rebuilt from its own config around `model` (its dual encoder),
    in eval mode on the model's device."""
    from mmssl.config import HeadsConfig, from_dict
    from mmssl.models.refs import checkpoint_ref, read_checkpoint
    from mmssl.objective import TERMS

    ref = checkpoint_ref(checkpoint)
    if not ref.is_checkpoint:
        raise UserError(f"{checkpoint} is not an mmssl checkpoint: only mmssl training saves a {head} head")
    payload = read_checkpoint(ref.path)
    heads = payload.get("heads")
    state = heads.get(head) if isinstance(heads, dict) else None
    term = next((term for term in TERMS if term.head == head), None)
    if not isinstance(state, dict) or term is None:    # {}: a head without parameters (a CoCa model's decoder)
        weight = term.weight if term is not None else f"{head}_weight"
        raise UserError(f"{ref.path} has no {head} head: train with loss.{weight} > 0")
    config = payload["config"] if isinstance(payload["config"], dict) else {}
    heads_cfg = from_dict(HeadsConfig, config.get("heads") or {}, "heads")
    module = term.build_head(model, None, heads_cfg)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserError(f"{ref.path}: its {head} head does not fit the model ({str(err).splitlines()[0]})") from None
    device = next(model.parameters()).device
    return module.to(device).eval()
