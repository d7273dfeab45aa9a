"""Captioning (CoCa: Yu et al. 2022, arXiv:2205.01917): a multimodal text decoder on top of the text tower.

CoCa splits its text decoder in two: the lower, unimodal half is causal self-attention over the
caption alone (its EOT state is the contrastive text embedding), the upper, multimodal half adds
cross-attention to the image's tokens and predicts the next token. Here the unimodal half is the
text tower itself: open_clip's native text transformer is causal, so its state at position t has
seen tokens <= t only, and the contrastive pass already computes every state
(`mmssl.models.tower_tokens`). The multimodal half is `mmssl.heads.fusion.Fusion(causal=True)`; its
states are scored against the text tower's token embedding (tied: no second vocabulary matrix)
plus a learned per-token bias.

Loss: teacher-forced next-token cross-entropy. The decoder state at position t predicts token t+1
(SOT predicts the first word, the last word predicts EOT); padding targets are ignored, and the
mean is over the real target tokens of the whole batch (a batch term, so gradient accumulation
stays exact). A Hugging Face text tower is bidirectional and is refused.

Generation (`generate`): from SOT, one token at a time (the prefix is recomputed each step:
captions are short), greedily or by beam search, until EOT or `max_tokens`; batched over images
and beams.

An open_clip CoCa model (`coca_ViT-B-32`, `tiny-coca-64`, ...) trains and decodes with its own
`text_decoder` instead: `mmssl.heads.coca.CoCaDecoderHead`, which `search` / `generate` dispatch to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import CaptionHeadConfig
from mmssl.errors import UserError
from mmssl.heads.fusion import Fusion
from mmssl.heads.itm import _text_heads
from mmssl.models.text_trim import _text_parts, can_trim
from mmssl.models.tower_tokens import image_token_width, image_tokens, text_pad_id, text_token_width, text_tokens


def require_causal_text_tower(model: nn.Module) -> None:
    from open_clip.hf_model import HFTextEncoder

    if isinstance(getattr(model, "text", None), HFTextEncoder):
        raise UserError("captioning needs a causal text tower (open_clip's native text transformer); this "
                        "model's is a Hugging Face (bidirectional) encoder: drop model.hf_text or "
                        "loss.caption_weight")
    if not can_trim(model):
        raise UserError("captioning needs open_clip's causal text transformer (causal mask, EOT pooling, "
                        "no class token)")


def token_embedding(model: nn.Module) -> nn.Embedding:
    tower, _, _ = _text_parts(model)
    return tower.token_embedding


@dataclass
class CaptionDraw:
    """The whole batch's caption token ids (the targets); a batch term, so every slice is the whole."""

    tokens: torch.Tensor     # [B, L]

    def rows(self, start: int, stop: int) -> "CaptionDraw":
        return self


class CaptionHead(nn.Module):
    """Causal fusion decoder over the text tower's states + tied vocabulary projection.

    `logits(model, image_tokens, text_states, valid)` -> [B, L, vocab]: position t's scores for token t+1.
    """

    def __init__(self, model: nn.Module, cfg: CaptionHeadConfig = CaptionHeadConfig()):
        super().__init__()
        require_causal_text_tower(model)
        width = text_token_width(model)
        self.fusion = Fusion(width, image_token_width(model.visual), cfg.layers, cfg.heads or _text_heads(model),
                             causal=True)
        self.bias = nn.Parameter(torch.zeros(token_embedding(model).num_embeddings))

    def decode(self, image_tokens: torch.Tensor | None, text_states: torch.Tensor, valid: torch.Tensor,
               image_index: torch.Tensor | None = None, memory: list | None = None) -> torch.Tensor:
        """[B, L, width] multimodal decoder states (caption row i reads image `image_index[i]`, or i;
        `memory`: `fusion.image_memory` of the images, kept across generation steps)."""
        return self.fusion(text_states, valid, image_tokens, image_index, memory)

    def log_likelihood(self, model: nn.Module, image_tokens: torch.Tensor, tokens: torch.Tensor,
                       image_index: torch.Tensor | None = None) -> torch.Tensor:
        """[N] sum over each caption's real target tokens of log p(token | earlier tokens, image):
        how CoCa scores a caption for an image."""
        valid = tokens != text_pad_id(model)
        states = text_tokens(model, tokens).tokens
        log_probs = torch.log_softmax(self.logits(model, image_tokens, states, valid, image_index).float(), dim=-1)
        picked = log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return (picked * valid[:, 1:]).sum(dim=1)

    def project(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states [..., width] (tied to the token embedding)."""
        weight = token_embedding(model).weight
        return states @ weight.to(states.dtype).t() + self.bias.to(states.dtype)

    def logits(self, model: nn.Module, image_tokens: torch.Tensor, text_states: torch.Tensor,
               valid: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(model, self.decode(image_tokens, text_states, valid, image_index))

    def loss(self, model: nn.Module, image_tokens: torch.Tensor, text_states: torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, mean over the batch's real target tokens (padding ignored)."""
        valid = tokens != text_pad_id(model)
        used = int(valid.any(dim=0).nonzero().max()) + 1 if valid.any() else 1   # drop all-padding columns
        tokens, valid, text_states = tokens[:, :used], valid[:, :used], text_states[:, :used]
        targets = valid[:, 1:]                        # position t predicts token t+1, where it is real
        states = self.decode(image_tokens, text_states, valid)[:, :-1][targets]
        if states.shape[0] == 0:
            return self.bias.sum() * 0.0
        logits = self.project(model, states)          # only the rows with a target: [N, vocab]
        return F.cross_entropy(logits.float(), tokens[:, 1:][targets])


# ---- generation --------------------------------------------------------------------------------

@dataclass
class Hypothesis:
    tokens: list          # generated ids, without SOT and EOT
    logprob: float        # sum of the log-probabilities of the generated ids (EOT included when emitted)
    length: int           # ids scored (EOT included when emitted)
    finished: bool        # ended with EOT (else stopped at max_tokens)

    @property
    def score(self) -> float:
        return self.logprob / max(self.length, 1)


StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (rows [N] image index, prefix [N, t]) -> [N, V]


def special_ids(model: nn.Module) -> tuple[int, int]:
    """(SOT, EOT) of the model's tokenizer."""
    tokenizer = model.tokenizer
    return int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)


def max_caption_tokens(model: nn.Module) -> int:
    """The most ids a caption can have after SOT (EOT included): the text tower's context length - 1."""
    tower, _, _ = _text_parts(model)
    return int(tower.positional_embedding.shape[0]) - 1


def _order(values: torch.Tensor) -> torch.Tensor:
    """Indices of `values` (last dim) from the highest down; ties keep the lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def greedy_search(step: StepFn, batch: int, sot: int, eot: int, max_tokens: int,
                  device: Optional[torch.device] = None) -> list:
    """The most likely next id at each step, for `batch` images at once -> [Hypothesis] per image."""
    prefix = torch.full((batch, 1), sot, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    logprob = torch.zeros(batch, dtype=torch.float64)
    length = torch.zeros(batch, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_tokens):
        scores = step(rows, prefix).double().cpu()      # every row, as beam search does: same numbers
        choice = torch.where(done, torch.full_like(done, eot, dtype=torch.long), _order(scores)[:, 0])
        logprob += torch.where(done, 0.0, scores.gather(1, choice[:, None]).squeeze(1))
        length += (~done).long()
        done |= choice == eot
        prefix = torch.cat([prefix, choice[:, None].to(prefix.device)], dim=1)
        if done.all():
            break
    out = []
    for row in range(batch):
        ids = prefix[row, 1:1 + int(length[row])].tolist()
        finished = bool(done[row])
        out.append(Hypothesis(ids[:-1] if finished else ids, float(logprob[row]), int(length[row]), finished))
    return out


def beam_search(step: StepFn, batch: int, sot: int, eot: int, max_tokens: int, beams: int,
                device: Optional[torch.device] = None) -> list:
    """Beam search over sums of log-probabilities, `beams` live beams per image, all images batched.

    Each step extends every live beam by every id and keeps, per image, the `beams` best non-EOT
    extensions; an EOT extension ranked among the first `beams` candidates is kept as a finished
    hypothesis. An image is done once it holds `beams` finished ones (Hugging Face's
    `early_stopping=True`; so one beam is exactly greedy search), or at `max_tokens`, when its live
    beams join the finished ones. The answer is the hypothesis with the highest log-prob / length
    (ties: the first found). Deterministic: ties in ranking keep the lower beam and id first.
    """
    k = beams
    prefix = torch.full((batch * k, 1), sot, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    scores = torch.full((batch, k), float("-inf"), dtype=torch.float64)
    scores[:, 0] = 0.0                                  # one live beam per image at the start
    finished: list = [[] for _ in range(batch)]
    done = [False] * batch
    for position in range(max_tokens):
        logp = step(rows, prefix).double().cpu()                           # [B*k, V]
        vocab = logp.shape[1]
        total = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
        order = _order(total)[:, :2 * k]
        new_scores = torch.full((batch, k), float("-inf"), dtype=torch.float64)
        next_ids = torch.full((batch, k), eot, dtype=torch.long)
        sources = torch.arange(batch * k).reshape(batch, k)   # dead beams keep their own (ignored) prefix
        for image in range(batch):
            if done[image]:
                continue
            kept = 0
            for rank, flat in enumerate(order[image].tolist()):
                value = float(total[image, flat])
                if value == float("-inf") or kept == k:
                    break
                beam, token = divmod(flat, vocab)
                source = image * k + beam
                if token == eot:
                    if rank < k:
                        ids = prefix[source, 1:].tolist()
                        finished[image].append(Hypothesis(ids, value, position + 1, True))
                    continue
                sources[image, kept] = source
                next_ids[image, kept] = token
                new_scores[image, kept] = value
                kept += 1
            if len(finished[image]) >= k:
                done[image] = True
        prefix = torch.cat([prefix[sources.reshape(-1).to(prefix.device)],
                            next_ids.reshape(-1, 1).to(prefix.device)], dim=1)
        scores = new_scores
        for image in range(batch):
            if done[image]:
                scores[image] = float("-inf")
        if all(done):
            break
    out = []
    for image in range(batch):
        candidates = list(finished[image])
        if not done[image]:               # stopped at max_tokens: the live beams are (truncated) candidates
            for beam in range(k):
                if scores[image, beam] > float("-inf"):
                    candidates.append(Hypothesis(prefix[image * k + beam, 1:].tolist(), float(scores[image, beam]),
                                                 prefix.shape[1] - 1, False))
        best = candidates[0]
        for candidate in candidates[1:]:
            if candidate.score > best.score:
                best = candidate
        out.append(best)
    return out


def caption_step(model: nn.Module, head: CaptionHead, images: torch.Tensor) -> StepFn:
    """The next-id log-probabilities given prefixes of `images` (their tokens computed once here)."""
    memory = head.fusion.image_memory(image_tokens(model, images).tokens)   # once for every step
    pad = text_pad_id(model)
    banned = sorted({pad, special_ids(model)[0]})    # never emit padding or a second SOT

    def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        valid = prefix != pad
        valid[:, 0] = True
        states = text_tokens(model, prefix).tokens
        decoded = head.decode(None, states, valid, rows, memory)[:, -1]
        logits = head.project(model, decoded).float()
        logits[:, banned] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    return step


def generate(model: nn.Module, head: CaptionHead, images: torch.Tensor, max_tokens: int = 20,
             beams: int = 1) -> list:
    """Token ids (without SOT / EOT) of a caption for each of `images` [B, 3, H, W]: greedy when
    `beams` is 1, beam search otherwise; at most `max_tokens` ids (EOT included), capped by the
    text tower's context length."""
    return [hypothesis.tokens for hypothesis in search(model, head, images, max_tokens, beams)]


def search(model: nn.Module, head: CaptionHead, images: torch.Tensor, max_tokens: int = 20,
           beams: int = 1) -> list:
    """`generate`'s hypotheses (ids, log-prob, length) per image."""
    if not isinstance(head, CaptionHead) and hasattr(head, "search"):
        return head.search(model, images, max_tokens, beams)     # a CoCa model's own decoder (heads.coca)
    if beams < 1 or max_tokens < 1:
        raise UserError(f"beams and max_tokens must be >= 1, got {beams} and {max_tokens}")
    require_causal_text_tower(model)
    sot, eot = special_ids(model)
    max_tokens = min(max_tokens, max_caption_tokens(model))
    with torch.no_grad():
        step = caption_step(model, head, images)
        if beams == 1:
            return greedy_search(step, images.shape[0], sot, eot, max_tokens, images.device)
        return beam_search(step, images.shape[0], sot, eot, max_tokens, beams, images.device)


def decode_caption(tokenizer, ids: list) -> str:
    """Text of generated ids (open_clip's SimpleTokenizer): SOT skipped, cut at the first EOT (so a
    tokenizer's padded row decodes too), special tokens stripped."""
    ids = [int(i) for i in ids]
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot in ids:
        ids = ids[:ids.index(eot)]
    ids = [i for i in ids if i != getattr(tokenizer, "sot_token_id", None)]
    text = tokenizer.decode(ids)
    for special in ("<start_of_text>", "<end_of_text>"):
        text = text.replace(special, " ")
    return " ".join(text.split())
