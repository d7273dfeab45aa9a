"""The jigsaw puzzle (Noroozi and Favaro 2016, arXiv:1603.09246): which permutation shuffled the
3x3 tiles of an image, from the tower's view of the shuffled tiles (the "context-free network").

Permutations (`permutation_set`): a fixed, deterministic set of `heads.jigsaw.permutations` of the
9 tiles, chosen greedily for a large Hamming distance (Noroozi's "maximal" set): the first is the
permutation of index floor(random.Random(SEED).random() * 9!) in the lexicographic order of all
9! = 362,880 (`random.random` is the one stream Python guarantees across versions), then each next
one is the permutation whose minimum Hamming distance to those chosen so far is largest, ties going
to the lowest lexicographic index. (Noroozi's Algorithm 1 ranks candidates by their summed distance
to the chosen set; the minimum ranks by the worst pair, what the classifier confuses.) The 100-set
has a minimum pairwise distance of 6 (mean 8.03); its first 9 are 9 apart (every slot differs), its
first 21 at least 8 and its first 93 at least 7. A prefix of a larger set is the smaller set. The set
is computed once per count (about 0.1 s for 100, 0.3 s for 1000, on one core) and cached.

Tiles: an H x W image is cut into 3x3 tiles of (H // 3) x (W // 3) pixels; the remainder rows and
columns (H mod 3, W mod 3) are dropped at the border, floor(r / 2) at the top / left and the rest at
the bottom / right (`tile_geometry`). Tiles are numbered 0..8 row-major, and a permutation p puts

    presented[i] = tile[p[i]]        (position / slot i shows the image's tile p[i])

The label is the permutation's index k in the set, p = permutation_set(count)[k], drawn uniformly
per image with the torch RNG (`draw`, once per step, sliced by gradient accumulation).

Two encodings (`heads.jigsaw.tiles`):

* `crops` (any tower): each tile is cropped to (t - floor(jitter t)) pixels per side at an offset
  drawn uniformly in [0, floor(jitter t)] per axis and per tile (`heads.jigsaw.jitter`: Noroozi's
  gap, so neighbours' edges do not line up: no continuity shortcut), the crops are put in presented
  order, resized to the tower's input size (`model.visual.image_size`, bilinear, no antialias) and
  encoded as one batch of 9B images (`model.visual`, shared weights); the 9 embeddings are
  concatenated in presented order, [B, 9 D];
* `tokens` (a ViT whose square patch grid side g divides by 3, 'tok' or 'avg' pooling, no patch
  dropout): the whole image is shuffled in pixel space (`shuffle_tiles`: slot i of the image holds
  tile p[i], the border remainder stays in place), the ViT runs once, and its patch tokens
  (`mmssl.models.tower_tokens.image_tokens`) are mean-pooled over each slot's (g/3)^2 patches and
  concatenated in slot order, [B, 9 width]. One tower pass per image instead of 9; no jitter;
* `auto`: `tokens` where the tower allows it, else `crops`.

Classifier: Linear(9 D, hidden_dim), LayerNorm, ReLU, Linear(hidden_dim, count) (`classifier`).
Loss: per image the cross-entropy of its permutation's index, `batch_share` of those.
"""
from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import JigsawHeadConfig
from mmssl.errors import UserError
from mmssl.heads.pretext import RowDraw, batch_share, classifier, embedding, vit_patch_grid
from mmssl.models.tower_tokens import image_token_width, image_tokens

GRID = 3                                 # tiles per side
TILES = GRID * GRID
SEED = 1603                              # picks the first permutation (arXiv:1603.09246)
ALL = math.factorial(TILES)              # 362,880


# ---------------------------------------------------------------- the permutation set

@functools.lru_cache(maxsize=1)
def all_permutations() -> np.ndarray:
    """[9!, 9] int8: every permutation of 0..8 in lexicographic order (read-only, cached)."""
    flat = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(TILES))), dtype=np.int8,
                       count=ALL * TILES)
    perms = flat.reshape(ALL, TILES)
    perms.flags.writeable = False
    return perms


def first_index() -> int:
    """The lexicographic index of the set's first permutation."""
    return int(random.Random(SEED).random() * ALL)


@functools.lru_cache(maxsize=None)
def permutation_set(count: int) -> np.ndarray:
    """[count, 9] int64: the greedy maximal-Hamming-distance permutations (read-only, cached per count).

    Row k is the permutation of label k; a prefix of a larger set is the smaller set."""
    if not isinstance(count, int) or not 1 <= count <= ALL:
        raise ValueError(f"permutation count must be an integer in [1, {ALL}], got {count!r}")
    columns = np.ascontiguousarray(all_permutations().T)          # [9, 9!]: one contiguous row per slot
    nearest = np.full(ALL, TILES + 1, dtype=np.int8)               # min distance to the chosen set
    distance = np.empty(ALL, dtype=np.int8)
    differs = np.empty(ALL, dtype=bool)
    chosen = [first_index()]
    while len(chosen) < count:
        pick = chosen[-1]
        distance[:] = 0
        for slot in range(TILES):
            np.not_equal(columns[slot], columns[slot, pick], out=differs)
            distance += differs
        np.minimum(nearest, distance, out=nearest)
        chosen.append(int(np.argmax(nearest)))                     # argmax: the lowest index of the ties
    result = all_permutations()[chosen].astype(np.int64)
    result.flags.writeable = False
    return result


# ---------------------------------------------------------------- tiles in pixel space

def tile_geometry(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, tile height, tile width) of the 3x3 grid: the remainder dropped at the border,
    floor(r / 2) before and the rest after."""
    tile_h, tile_w = height // GRID, width // GRID
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"the jigsaw needs images of at least {GRID}x{GRID} pixels, got {height}x{width}")
    return (height - GRID * tile_h) // 2, (width - GRID * tile_w) // 2, tile_h, tile_w


def crop_side(tile: int, jitter: float) -> int:
    """A jittered crop's side: `tile` less floor(jitter * tile) (the largest offset), at least 1."""
    return max(1, tile - int(jitter * tile + 1e-9))


def grid_tiles(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 9, C, t_h, t_w] the 3x3 tiles in row-major order (`tile_geometry`)."""
    b, c, h, w = images.shape
    top, left, th, tw = tile_geometry(h, w)
    x = images[:, :, top:top + GRID * th, left:left + GRID * tw]
    return x.reshape(b, c, GRID, th, GRID, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, TILES, c, th, tw)


def present(tiles: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """[B, 9, ...] tiles, [B, 9] permutations -> presented[b, i] = tiles[b, orders[b, i]]."""
    rows = torch.arange(tiles.shape[0], device=tiles.device)[:, None]
    return tiles[rows, orders]


def shuffle_tiles(images: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] with slot i holding tile orders[b, i] (in place of tile i); the border remainder
    pixels stay where they were. A new tensor; `images` is not changed."""
    b, c, h, w = images.shape
    top, left, th, tw = tile_geometry(h, w)
    shown = present(grid_tiles(images), orders)                                   # [B, 9, C, th, tw]
    shown = shown.reshape(b, GRID, GRID, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, GRID * th, GRID * tw)
    out = images.clone()
    out[:, :, top:top + GRID * th, left:left + GRID * tw] = shown
    return out


def tile_crops(images: torch.Tensor, offsets: torch.Tensor, jitter: float) -> torch.Tensor:
    """[B, 9, C, c_h, c_w] each tile's jittered crop, in tile (row-major grid) order: tile j's crop
    starts `offsets[b, j]` = (dy, dx) pixels inside the tile (`crop_side` pixels per side)."""
    b, c, h, w = images.shape
    top, left, th, tw = tile_geometry(h, w)
    ch, cw = crop_side(th, jitter), crop_side(tw, jitter)
    device = images.device
    tile_row = torch.arange(TILES, device=device) // GRID
    tile_col = torch.arange(TILES, device=device) % GRID
    y0 = top + tile_row * th + offsets[..., 0]                                   # [B, 9]
    x0 = left + tile_col * tw + offsets[..., 1]
    ys = y0[..., None] + torch.arange(ch, device=device)                         # [B, 9, ch]
    xs = x0[..., None] + torch.arange(cw, device=device)                         # [B, 9, cw]
    rows = torch.arange(b, device=device)[:, None, None, None]
    crops = images[rows, :, ys[..., :, None], xs[..., None, :]]                  # [B, 9, ch, cw, C]
    return crops.permute(0, 1, 4, 2, 3)


# ---------------------------------------------------------------- the step's draw

@dataclass
class JigsawDraw(RowDraw):
    permutation: torch.Tensor        # [B] long: each image's label, an index into the permutation set


@dataclass
class JigsawCropDraw(JigsawDraw):
    offsets: torch.Tensor            # [B, 9, 2] long: (dy, dx) of each tile's crop inside the tile (crops mode)


# ---------------------------------------------------------------- which encoding

def tokens_grid(visual: nn.Module) -> tuple[Optional[int], str]:
    """(g, "") when `tokens` mode works on this tower (`vit_patch_grid`, and g divisible by 3), else
    (None, why not)."""
    grid, why = vit_patch_grid(visual)
    if grid is not None and grid % GRID:
        return None, f"the ViT's patch grid is {grid}x{grid}, whose side does not divide by {GRID}"
    return grid, why


def resolve_tiles(visual: nn.Module, tiles: str) -> str:
    """`heads.jigsaw.tiles` made concrete: tokens or crops (auto: tokens where it works)."""
    grid, why = tokens_grid(visual)
    if tiles == "auto":
        return "tokens" if grid is not None else "crops"
    if tiles == "tokens" and grid is None:
        raise UserError(f"heads.jigsaw.tiles=tokens pools a ViT's patch tokens per tile, but {why}: "
                        "use heads.jigsaw.tiles=crops (or auto)")
    return tiles                        # the config allows only auto | tokens | crops


def input_size(visual: nn.Module) -> tuple[int, int]:
    """(height, width) the tower takes: `visual.image_size` (an int or a pair)."""
    size = getattr(visual, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise UserError(f"the jigsaw head (heads.jigsaw.tiles=crops) resizes tiles to the image tower's "
                    f"image_size, which this tower ({type(visual).__name__}) does not have")


# ---------------------------------------------------------------- the head

class JigsawHead(nn.Module):
    """The permutation set, the tile encoding (`mode`: tokens | crops) and the classifier."""

    def __init__(self, model: nn.Module, cfg: JigsawHeadConfig):
        super().__init__()
        visual = model.visual
        self.count, self.jitter = cfg.permutations, cfg.jitter
        self.mode = resolve_tiles(visual, cfg.tiles)
        # [count, 9] the set: recomputed from the count (deterministic), never saved
        self.register_buffer("orders", torch.from_numpy(permutation_set(self.count).copy()), persistent=False)
        if self.mode == "tokens":
            self.grid, _ = tokens_grid(visual)
            width = image_token_width(visual)
        else:
            self.size = input_size(visual)
            width = visual.output_dim
        self.classify = classifier(TILES * width, cfg.hidden_dim, self.count)

    def draw(self, model: nn.Module, images: torch.Tensor, step) -> JigsawDraw:
        """Each image's permutation label and, in crops mode, its tiles' crop offsets."""
        b, device = images.shape[0], images.device
        permutation = torch.randint(0, self.count, (b,), device=device)
        if self.mode == "tokens":
            return JigsawDraw(permutation)
        _, _, th, tw = tile_geometry(*images.shape[-2:])
        offsets = []
        for tile in (th, tw):
            largest = tile - crop_side(tile, self.jitter)
            offsets.append(torch.randint(0, largest + 1, (b, TILES), device=device) if largest > 0
                           else torch.zeros(b, TILES, dtype=torch.long, device=device))
        return JigsawCropDraw(permutation, torch.stack(offsets, dim=-1))

    def tile_features(self, model: nn.Module, images: torch.Tensor, draw: JigsawDraw) -> torch.Tensor:
        """[B, 9 D] the tiles' embeddings (crops) or pooled tokens (tokens), in presented order."""
        orders = self.orders[draw.permutation]                                    # [B, 9]
        b = images.shape[0]
        if self.mode == "tokens":
            tokens = image_tokens(model.visual, shuffle_tiles(images, orders)).tokens[:, 1:]   # the pooled first
            g, w = self.grid, tokens.shape[-1]
            if tokens.shape[1] != g * g:
                raise UserError(f"the jigsaw head expects {g * g} patch tokens (a {g}x{g} grid) from the image "
                                f"tower, got {tokens.shape[1]}: are the images the model's size?")
            side = g // GRID
            return tokens.reshape(b, GRID, side, GRID, side, w).mean(dim=(2, 4)).reshape(b, TILES * w)
        shown = present(tile_crops(images, draw.offsets, self.jitter), orders)    # [B, 9, C, ch, cw]
        tiles = F.interpolate(shown.flatten(0, 1), size=self.size, mode="bilinear", align_corners=False,
                              antialias=False)
        features = embedding(model, tiles)                                        # [9B, D]
        return features.reshape(b, -1)

    def logits(self, model: nn.Module, images: torch.Tensor, draw: JigsawDraw) -> torch.Tensor:
        """[B, count] the classifier's scores of each permutation."""
        return self.classify(self.tile_features(model, images, draw))

    def loss(self, model: nn.Module, images: torch.Tensor, draw: Optional[JigsawDraw], batch_size: int) -> torch.Tensor:
        if draw is None:
            raise ValueError("the jigsaw loss needs the step's draw (JigsawHead.draw)")
        per_row = F.cross_entropy(self.logits(model, images, draw).float(), draw.permutation, reduction="none")
        return batch_share(per_row, batch_size)


PRETEXT_HEAD = JigsawHead
