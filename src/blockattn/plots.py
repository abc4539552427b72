"""Pictures of layouts and results (matplotlib, headless)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def block_picture(layout) -> torch.Tensor:
    """`[H, nQ, nK]` for batch 0: 1.0 full tile, 0.5 tile with a token-level constraint (causal /
    window edge or explicit mask), 0 skipped."""
    from blockattn.layout import _tile_bounds

    b, h, qb, kb = layout.listed_tiles()
    picture = torch.zeros(layout.heads, layout.num_q_blocks, layout.num_k_blocks)
    first_batch = b == 0
    b, h, qb, kb = b[first_batch], h[first_batch], qb[first_batch], kb[first_batch]
    if len(b):
        masks = layout.tile_token_masks(b, h, qb, kb)
        bounds = _tile_bounds(qb, kb, layout.q_len, layout.k_len, layout.block_q, layout.block_k)
        full = (masks | ~bounds).flatten(1).all(1)
        picture[h, qb, kb] = torch.where(full, 1.0, 0.5)
    return picture


def plot_layout(layout, path: str, *, max_heads: int = 16, title: str | None = None) -> str:
    """PNG of the block matrix of each head of batch 0 (see `block_picture`)."""
    heads = min(layout.heads, max_heads)
    picture = block_picture(layout)
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for head in range(heads):
        ax = axes.flat[head]
        ax.imshow(picture[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {head}" if layout.heads > 1 else "all heads", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        ax.axis("on")
    fig.suptitle(title or f"q_len={layout.q_len} k_len={layout.k_len} block=({layout.block_q},{layout.block_k}) "
                 f"density={layout.density():.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
