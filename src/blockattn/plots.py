"""Pictures of layouts and results, drawn on `matplotlib.figure.Figure` objects: no pyplot state and
no `matplotlib.use`, so importing or calling this leaves the process's matplotlib backend alone."""
from __future__ import annotations

import math

import torch

TOKEN_ZOOM_LIMIT = 1 << 22  # token masks are drawn up to 2048 x 2048 positions


def figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float]):
    """(figure, axes `[rows, cols]`): a standalone figure that renders with Agg when saved."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save(fig, path: str, *, dpi: int = 110) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


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


def plot_layout(layout, path: str, *, max_heads: int = 16, title: str | None = None,
                token_masks: bool = False) -> str:
    """PNG of the block matrix of each head of batch 0 (see `block_picture`); with `token_masks`, a
    second row with each head's token mask when `q_len * k_len` is small enough to look at."""
    heads = min(layout.heads, max_heads)
    picture = block_picture(layout)
    zoom = token_masks and layout.q_len * layout.k_len <= TOKEN_ZOOM_LIMIT
    if zoom:
        rows, cols = 2, heads
        fig, axes = figure(2, heads, figsize=(max(3.3 * heads, 6.0), 6.8))
    else:
        cols = min(heads, 4)
        rows = math.ceil(heads / cols)
        fig, axes = figure(rows, cols, figsize=(3.2 * cols, 3.2 * rows))
    for ax in axes.flat:
        ax.axis("off")
    tokens = layout.to_token_mask()[0] if zoom else None
    for head in range(heads):
        name = f"head {head}" if layout.heads > 1 else "all heads"
        ax = axes[0, head] if zoom else axes.flat[head]
        ax.axis("on")
        ax.imshow(picture[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: blocks {layout.block_q}x{layout.block_k}" if zoom else name, fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        if zoom:
            ax = axes[1, head]
            ax.axis("on")
            ax.imshow(tokens[min(head, tokens.shape[0] - 1)].float().numpy(), cmap="Greys", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(f"{name}: token mask", fontsize=9)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    default = (f"q_len={layout.q_len} k_len={layout.k_len} block=({layout.block_q},{layout.block_k}) "
               f"tiles computed {layout.density():.3f}" + (f"  token pairs {layout.token_density():.3f}" if zoom else ""))
    fig.suptitle(title or default, fontsize=10)
    return save(fig, path)
