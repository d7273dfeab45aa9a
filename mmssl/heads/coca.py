"""Captioning with open_clip's own CoCa model (`open_clip.coca_model.CoCa`, e.g. `coca_ViT-B-32` or the
bundled `tiny-coca-64`): the caption term trains the model's own `text_decoder`.

A CoCa model carries its multimodal decoder inside the model, so `loss.caption_weight > 0` builds
`CoCaDecoderHead`, a head with no parameters of its own: its loss, likelihood and generation call
`model.text_decoder` on what `model._encode_image` / `model._encode_text` return
(`mmssl.models.tower_tokens`, the same pass that gives the contrastive features). The decoder's
weights are part of the model's state dict, so a checkpoint's `heads["caption"]` is empty and
`mmssl export` writes them with the rest of the model: open_clip loads the export as a CoCa.

Loss: open_clip's `CoCaLoss` caption part, `cross_entropy(text_decoder(image_embs, token_embs[:, :-1]),
texts[:, 1:], ignore_index=pad)`: the mean over the batch's real (non-padding) target tokens.

Generation (`search`):
* greedy (`beams=1`) is exactly open_clip's `model.generate(images, generation_type="top_k", top_k=1,
  seq_len=max_tokens + 1, min_seq_len=min_tokens + 1)`: the same loop on the same batched forward,
  the next id is the top logit (open_clip samples among tied maxima; here the lowest id wins), EOT
  is forbidden while fewer than `min_tokens` ids are out, the last allowed position is forced to
  EOT, and a row that emitted EOT or the padding id is done. It is reimplemented rather than called
  because open_clip's `generate` refuses to run with transformers >= 5 (it imports
  `BeamSearchScorer`, which transformers removed); the result is then stripped of SOT and cut at
  the first EOT or padding id;
* beam search (`beams > 1`) is mmssl's own (`mmssl.heads.caption.beam_search`, padding and SOT never
  emitted), not open_clip's group beam search (which needs `BeamSearchScorer` as well).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.errors import UserError
from mmssl.models.tower_tokens import is_coca, text_tokens


def require_coca(model: nn.Module) -> None:
    if not is_coca(model):
        raise UserError(f"the CoCa decoder head needs an open_clip CoCa model, got {type(model).__name__}")


def pad_id(model: nn.Module) -> int:
    return int(getattr(model, "pad_id", 0))


def max_coca_tokens(model: nn.Module) -> int:
    """The most ids a caption can have after SOT (EOT included): the shorter context - 1."""
    return min(int(model.text.context_length), int(model.context_length)) - 1


class CoCaDecoderHead(nn.Module):
    """The caption head of a CoCa model: no parameters; everything runs `model.text_decoder`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        require_coca(model)

    def logits(self, model: nn.Module, image_tokens: torch.Tensor, text_states: torch.Tensor,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L, vocab]: position t's scores for token t+1 (caption row i reads image `image_index[i]`)."""
        if image_index is not None:
            image_tokens = image_tokens[image_index]
        return model.text_decoder(image_tokens, text_states)

    def loss(self, model: nn.Module, image_tokens: torch.Tensor, text_states: torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's CoCaLoss caption term: next-token CE, mean over real targets (padding ignored)."""
        logits = self.logits(model, image_tokens, text_states[:, :-1])
        targets = tokens[:, 1:]
        if not (targets != pad_id(model)).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.permute(0, 2, 1).float(), targets, ignore_index=pad_id(model))

    def log_likelihood(self, model: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor,
                       image_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N] sum over each caption's real target tokens of log p(token | earlier tokens, image)."""
        states = text_tokens(model, tokens).tokens
        log_probs = torch.log_softmax(self.logits(model, image_tokens, states[:, :-1], image_index).float(), dim=-1)
        targets = tokens[:, 1:]
        picked = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        return (picked * (targets != pad_id(model))).sum(dim=1)

    def search(self, model: nn.Module, images: torch.Tensor, max_tokens: int = 20, beams: int = 1,
               min_tokens: int = 0) -> list:
        """Hypotheses (ids without SOT / EOT, log-prob, length) per image: open_clip's greedy
        `generate` when `beams` is 1, mmssl's beam search over the CoCa decoder otherwise."""
        from mmssl.heads.caption import beam_search, special_ids

        if beams < 1 or max_tokens < 1:
            raise UserError(f"beams and max_tokens must be >= 1, got {beams} and {max_tokens}")
        max_tokens = min(max_tokens, max_coca_tokens(model))
        if not 0 <= min_tokens < max_tokens:
            raise UserError(f"min_tokens must be in [0, max_tokens), got {min_tokens}")
        with torch.no_grad():
            if beams == 1:
                return greedy_generate(model, images, seq_len=max_tokens + 1, min_seq_len=min_tokens + 1)
            sot, eot = special_ids(model)
            return beam_search(coca_step(model, images), images.shape[0], sot, eot, max_tokens, beams, images.device)


def coca_step(model: nn.Module, images: torch.Tensor):
    """Next-id log-probabilities given prefixes (rows: image index), for mmssl's beam search."""
    from mmssl.heads.caption import special_ids

    _, embs = model._encode_image(images)
    banned = sorted({pad_id(model), special_ids(model)[0]})

    def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        _, states = model._encode_text(prefix)
        logits = model.text_decoder(embs[rows], states)[:, -1].float()
        logits[:, banned] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    return step


def greedy_generate(model: nn.Module, images: torch.Tensor, seq_len: int, min_seq_len: int = 1) -> list:
    """open_clip's `CoCa.generate(images, generation_type="top_k", top_k=1, seq_len=seq_len,
    min_seq_len=min_seq_len)`, step for step (see the module doc), as [Hypothesis] per image."""
    from mmssl.heads.caption import Hypothesis, special_ids

    sot, eot = special_ids(model)
    pad = pad_id(model)
    device = images.device
    was_training = model.training
    model.eval()
    try:
        image_latent, image_embs = model._encode_image(images)
        out = torch.full((images.shape[0], 1), sot, dtype=torch.long, device=device)
        logprob = torch.zeros(images.shape[0], dtype=torch.float64)
        while True:
            cur_len = out.shape[1]
            logits = model(images, out, image_latent=image_latent, image_embs=image_embs,
                           output_labels=False)["logits"][:, -1]
            done = (out[:, -1] == eot) | (out[:, -1] == pad)
            if done.all():
                break
            live = logits[~done]
            if cur_len < min_seq_len:                       # MinLengthLogitsProcessor
                live = live.clone()
                live[:, eot] = float("-inf")
            choice = torch.argmax(live, dim=-1)             # top_k=1: the only id with probability > 0
            if cur_len + 1 == seq_len:
                choice = torch.full_like(choice, eot)       # the last position is forced to EOT
            logprob[(~done).cpu()] += torch.log_softmax(live.float(), dim=-1).gather(
                1, choice[:, None]).squeeze(1).double().cpu()
            sample = torch.full((out.shape[0], 1), pad, dtype=torch.long, device=device)
            sample[~done, 0] = choice
            out = torch.cat([out, sample], dim=1)
            if out.shape[1] >= seq_len:                     # MaxLengthCriteria
                break
    finally:
        model.train(was_training)
    hypotheses = []
    for row, value in zip(out[:, 1:].tolist(), logprob.tolist()):
        ends = [position for position, token in enumerate(row) if token in (eot, pad)]
        cut = ends[0] if ends else len(row)
        finished = bool(ends) and row[cut] == eot
        hypotheses.append(Hypothesis(row[:cut], value, cut + int(bool(ends)), finished))
    return hypotheses


def open_clip_generated_ids(row: list, sot: int, eot: int, pad: int) -> list:
    """The caption ids of one row of open_clip's `generate` output: SOT dropped, cut at EOT or padding."""
    ids = [int(token) for token in row]
    if ids and ids[0] == sot:
        ids = ids[1:]
    for position, token in enumerate(ids):
        if token in (eot, pad):
            return ids[:position]
    return ids
