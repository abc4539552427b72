"""In-context linear regression with one layer of multi-head softmax attention, trained here.

He, Pan, Chen, Yang, "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention", ICML 2025 (arXiv 2503.12734); official code
XintianPan/ICL_linear (src/models.py, utils/data_utils.py, icl_linear.ipynb).

Data (the official generator): x_l, x_q ~ N(0, I_d), w ~ N(0, I_d / d), y = w.x + eps with
eps ~ N(0, 0.1); d = 5, n = 8d = 40 context pairs. Tokens z_l = (x_l, y_l), query z_q = (x_q, 0).
Model: per head h, full-width W_Q, W_K, W_V in R^{(d+1)x(d+1)} and W_O: H(d+1) -> 1; the query
token attends to the n context tokens only (not itself), logits scaled by (d+1)^-1/2; no bias,
positional code, MLP or norm. Here that attention is `blockattn.attention` with the dense
`full(1, n)` layout. The paper's findings, which `pattern_stats` measures on a trained model:
KQ^h = W_K^hT W_Q^h / sqrt(d+1) has an x-block ~ omega_h I_d (diagonal, homogeneous) and ~0 y-row and
column; OV^h = W_V^hT W_O^hT has only its last entry mu_h (the value's y coordinate) non-negligible;
sum_h mu_h ~ 0 with mu_h omega_h > 0. To first order in omega this is the debiased one-step GD
predictor y^ = (sum_h mu_h omega_h) (1/n) sum_l (y_l - ybar) x_l.x_q, which beats single-head attention.

Scaled to this CPU: the paper's optimiser (Adam, lr 1e-3, batch 256, fresh prompts every step) for
12k steps instead of 500k. From random init the heads first sit on the single-head solution (same-sign
omega, loss ~0.40) and split into the opposite-sign pair after ~5k steps here; a higher learning rate
(3e-3) keeps them on that plateau, so the paper's 1e-3 is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

import blockattn
from blockattn._checks import int_arg, number_arg
from blockattn.patterns import full

__all__ = ["ICLConfig", "MultiHeadSoftmaxICL", "sample_prompts", "debiased_gd", "vanilla_gd", "ridge",
           "best_step", "kq_ov", "pattern_stats", "train", "evaluate", "experiment"]


@dataclass
class ICLConfig:
    """The paper's setting (d = 5, n = 8d, noise variance 0.1, Adam at a constant lr 1e-3, batch 256)
    with this CPU's step count (the paper: 500k)."""
    d: int = 5
    n: int = 40
    noise_var: float = 0.1
    batch: int = 256
    steps: int = 12000
    lr: float = 1e-3


def sample_prompts(batch: int, n: int, d: int, *, noise_var: float = 0.1, generator: torch.Generator | None = None,
                   device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """`batch` prompts of `n` pairs: `z [B, n, d+1]` (rows (x_l, y_l)), `z_q [B, 1, d+1]` (x_q, 0) and the
    query's label `y_q [B]`, with w ~ N(0, I_d / d) per prompt as the official generator draws it."""
    batch, n, d = int_arg("batch", batch), int_arg("n", n), int_arg("d", d)
    noise_var = number_arg("noise_var", noise_var, low=0.0)
    device = torch.device("cpu") if device is None else torch.device(device)
    gen_device = torch.device("cpu") if generator is None else generator.device

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    x, x_q = normal(batch, n, d), normal(batch, 1, d)
    w = normal(batch, d, 1) * d ** -0.5
    noise_std = math.sqrt(noise_var)
    y = x @ w + noise_std * normal(batch, n, 1)
    y_q = (x_q @ w).view(batch) + noise_std * normal(batch)
    z = torch.cat([x, y], dim=-1)
    z_q = torch.cat([x_q, torch.zeros(batch, 1, 1, device=device, dtype=dtype)], dim=-1)
    return z, z_q, y_q


class MultiHeadSoftmaxICL(nn.Module):
    """One layer of `heads` softmax attention heads of full width d+1 reading the query token's output
    into one scalar (the paper's single-layer `MultiHeadAttention` with n_out = 1, random init)."""

    def __init__(self, d: int = 5, heads: int = 2, *, backend: str = "auto"):
        super().__init__()
        self.d, self.heads, self.backend = int_arg("d", d), int_arg("heads", heads), backend
        width = d + 1
        self.q_proj = nn.Linear(width, width * heads, bias=False)
        self.k_proj = nn.Linear(width, width * heads, bias=False)
        self.v_proj = nn.Linear(width, width * heads, bias=False)
        self.o_proj = nn.Linear(width * heads, 1, bias=False)
        self._layouts: dict[int, object] = {}

    def forward(self, z: Tensor, z_q: Tensor) -> Tensor:
        """`z [B, n, d+1]`, `z_q [B, 1, d+1]` -> `y_hat [B]`."""
        width = self.d + 1
        for name, t in (("z", z), ("z_q", z_q)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{name} must be [B, {'n' if name == 'z' else 1}, {width}], got {list(t.shape)}")
        if z_q.shape[:2] != (z.shape[0], 1):
            raise ValueError(f"z_q must be [B, 1, {width}] with z's batch {z.shape[0]}, got {list(z_q.shape)}")
        batch, n = z.shape[:2]

        def heads(t):
            return t.view(batch, t.shape[1], self.heads, width).transpose(1, 2)
        q, k, v = heads(self.q_proj(z_q)), heads(self.k_proj(z)), heads(self.v_proj(z))
        if n not in self._layouts:
            self._layouts[n] = full(1, n)
        out = blockattn.attention(q, k, v, self._layouts[n].to(z.device), scale=width ** -0.5,
                                  backend=self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(batch, self.heads * width)).view(batch)


# ------------------------------------------------------------------------------------------- predictors

def _split(z: Tensor, z_q: Tensor):
    return z[..., :-1], z[..., -1], z_q[:, 0, :-1]


def debiased_gd(z: Tensor, z_q: Tensor, step: float) -> Tensor:
    """One gradient step from w = 0 on the centred least squares (1/2n) sum_l ((y_l - ybar) - w.(x_l - xbar))^2,
    evaluated at x_q: `step * (1/n) sum_l (y_l - ybar) x_l.x_q` (the paper's debiased GD predictor)."""
    x, y, x_q = _split(z, z_q)
    y_centred = y - y.mean(dim=1, keepdim=True)
    return step * torch.einsum("bn,bnd,bd->b", y_centred, x, x_q) / x.shape[1]


def vanilla_gd(z: Tensor, z_q: Tensor, step: float) -> Tensor:
    """One gradient step from w = 0 on (1/2n) sum_l (y_l - w.x_l)^2: `step * (1/n) sum_l y_l x_l.x_q`."""
    x, y, x_q = _split(z, z_q)
    return step * torch.einsum("bn,bnd,bd->b", y, x, x_q) / x.shape[1]


def ridge(z: Tensor, z_q: Tensor, noise_var: float = 0.1) -> Tensor:
    """The Bayes-optimal predictor for w ~ N(0, I/d): ridge with lambda = noise_var * d (the posterior mean)."""
    x, y, x_q = _split(z, z_q)
    d = x.shape[-1]
    gram = x.transpose(1, 2) @ x + noise_var * d * torch.eye(d, dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, (x.transpose(1, 2) @ y.unsqueeze(-1))).squeeze(-1)
    return (w * x_q).sum(-1)


def best_step(predictor, z: Tensor, z_q: Tensor, y_q: Tensor) -> float:
    """The step size minimising the mean squared error of a predictor linear in its step (closed form)."""
    g = predictor(z, z_q, 1.0)
    return float((g * y_q).sum() / (g * g).sum())


# --------------------------------------------------------------------------------------------- patterns

@torch.no_grad()
def kq_ov(model: MultiHeadSoftmaxICL) -> tuple[Tensor, Tensor]:
    """Per head, `KQ [H, d+1, d+1]` with logit_l = z_l^T KQ z_q (scale included) and `OV [H, d+1]` with the
    head's contribution to y_hat = OV . (attention-weighted z)."""
    h, width = model.heads, model.d + 1
    w_q = model.q_proj.weight.view(h, width, width)
    w_k = model.k_proj.weight.view(h, width, width)
    w_v = model.v_proj.weight.view(h, width, width)
    w_o = model.o_proj.weight.view(h, width)
    kq = w_k.transpose(1, 2) @ w_q * width ** -0.5
    ov = (w_o.unsqueeze(1) @ w_v).squeeze(1)
    return kq.float().cpu(), ov.float().cpu()


def pattern_stats(kq: Tensor, ov: Tensor) -> dict:
    """The paper's patterns as numbers. Per head: omega (mean of the x-block diagonal), `offdiag`
    (off-diagonal share of the x-block's energy), `spread` (std / |mean| of that diagonal: 0 when
    homogeneous), `y_share` (the key-y row's share of the energy of the columns that act: the query's y
    slot is always 0, so the last column gets no gradient and keeps its init), mu (the OV last entry) and
    `last_share` (its share of the OV energy). Across heads: `zero_sum` = |sum mu| / sum |mu| and
    `effective_step` = sum mu omega (the debiased GD step the heads implement)."""
    d = kq.shape[-1] - 1
    x_block = kq[:, :d, :d]
    diag = torch.diagonal(x_block, dim1=1, dim2=2)
    energy = x_block.pow(2).sum((1, 2))
    omega = diag.mean(1)
    mu = ov[:, -1]
    heads = []
    for h in range(kq.shape[0]):
        heads.append(dict(omega=float(omega[h]), mu=float(mu[h]),
                          offdiag=float((energy[h] - diag[h].pow(2).sum()) / energy[h]),
                          spread=float(diag[h].std() / diag[h].mean().abs()),
                          y_share=float(kq[h, d, :d].pow(2).sum() / kq[h, :, :d].pow(2).sum()),
                          last_share=float(mu[h] ** 2 / ov[h].pow(2).sum())))
    return dict(heads=heads, zero_sum=float(mu.sum().abs() / mu.abs().sum()),
                effective_step=float((mu * omega).sum()))


# ---------------------------------------------------------------------------------------------- training

def train(heads: int, config: ICLConfig = ICLConfig(), *, seed: int = 0, progress=None,
          backend: str = "auto") -> tuple[MultiHeadSoftmaxICL, list[float]]:
    """Adam on the query's squared error with fresh prompts every step (seeded); returns the model and
    the per-step losses."""
    torch.manual_seed(seed)
    model = MultiHeadSoftmaxICL(config.d, heads, backend=backend)
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses = []
    for step in range(config.steps):
        z, z_q, y_q = sample_prompts(config.batch, config.n, config.d, noise_var=config.noise_var,
                                     generator=generator)
        loss = (model(z, z_q) - y_q).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    return model, losses


@torch.no_grad()
def evaluate(models: dict, lengths, config: ICLConfig = ICLConfig(), *, prompts: int = 20000, seed: int = 1234,
             chunk: int = 5000) -> list[dict]:
    """Test MSE (noise included) at each context length n of every trained model, beside the debiased and
    vanilla one-step GD predictors with their step tuned per n on the same prompts, the debiased GD with
    each multi-head model's own effective step, and the Bayes-optimal ridge."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for n in lengths:
        z, z_q, y_q = sample_prompts(prompts, n, config.d, noise_var=config.noise_var, generator=generator)
        row = dict(n=n)
        for name, model in models.items():
            pred = torch.cat([model(z[i:i + chunk], z_q[i:i + chunk]) for i in range(0, prompts, chunk)])
            row[name] = float((pred - y_q).pow(2).mean())
            if model.heads > 1:
                step = pattern_stats(*kq_ov(model))["effective_step"]
                row[f"dgd step of {name}"] = float((debiased_gd(z, z_q, step) - y_q).pow(2).mean())
        for label, predictor in (("debiased gd (tuned)", debiased_gd), ("gd (tuned)", vanilla_gd)):
            step = best_step(predictor, z, z_q, y_q)
            row[label] = float((predictor(z, z_q, step) - y_q).pow(2).mean())
            row[f"{label} step"] = step
        row["ridge (bayes)"] = float((ridge(z, z_q, config.noise_var) - y_q).pow(2).mean())
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- experiment

def _plot_matrices(stats_by_model: dict, matrices: dict, path: str) -> str:
    from blockattn.plots import figure, save

    columns = sum(kq.shape[0] for kq, _ in matrices.values())
    fig, axes = figure(2, columns, figsize=(2.6 * columns, 5.4))
    col = 0
    for name, (kq, ov) in matrices.items():
        for h in range(kq.shape[0]):
            limit = float(kq[h].abs().max())
            top, bottom = axes[0][col], axes[1][col]
            image = top.imshow(kq[h].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            fig.colorbar(image, ax=top, fraction=0.046)
            top.set_title(f"{name} head {h}: KQ\nomega = {stats_by_model[name]['heads'][h]['omega']:.3f}", fontsize=8)
            limit = float(ov.abs().max())
            image = bottom.imshow(ov[h].view(-1, 1).numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            fig.colorbar(image, ax=bottom, fraction=0.2)
            bottom.set_title(f"OV (mu = {stats_by_model[name]['heads'][h]['mu']:.2f})", fontsize=8)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks(range(kq.shape[-1]),
                              [f"x{i}" for i in range(kq.shape[-1] - 1)] + ["y"], fontsize=6)
            col += 1
    fig.suptitle("KQ (rows: key token z_l, cols: query z_q; the query's y slot is always 0, so the last column "
                 "keeps its init) and OV per head", fontsize=9)
    return save(fig, path)


def _plot_errors(rows: list[dict], losses: dict, train_n: int, path: str) -> str:
    from blockattn.plots import figure, save

    fig, axes = figure(1, 2, figsize=(11, 4))
    left, right = axes[0]
    for name, curve in losses.items():
        smooth = max(1, len(curve) // 100)
        points = [sum(curve[i:i + smooth]) / len(curve[i:i + smooth]) for i in range(0, len(curve), smooth)]
        left.plot([i * smooth for i in range(len(points))], points, label=name)
    left.set_xlabel("step")
    left.set_ylabel("training MSE")
    left.set_yscale("log")
    left.legend(fontsize=8)
    lengths = [r["n"] for r in rows]
    labels = [k for k in rows[0] if k != "n" and not k.endswith(" step")]
    for label in labels:
        style = ":" if ("gd" in label or "ridge" in label) else "-"
        right.plot(lengths, [r[label] for r in rows], style, marker="o", markersize=3, label=label)
    right.set_xlabel(f"context pairs n (trained at n = {train_n})")
    right.set_ylabel("test MSE (noise 0.1 included)")
    right.legend(fontsize=7)
    fig.suptitle("In-context linear regression, one layer of softmax attention")
    return save(fig, path)


def experiment(*, heads=(1, 2, 4), config: ICLConfig | None = None, steps: int | None = None,
               batch: int | None = None, lengths=(10, 20, 30, 40, 60, 80, 100), prompts: int = 20000, seed: int = 0,
               tiny: bool = False, out: str = ".", progress_factory=None) -> dict:
    """Train one model per head count, measure the patterns and the error-vs-n curves, write
    `icl_regression_patterns.png` and `icl_regression_error.png` under `out`. `steps` and `batch`
    override the config's; `tiny` is a seconds-long smoke run (d = 3, n = 12, 20 steps)."""
    import os

    if config is None:
        config = ICLConfig(d=3, n=12, batch=32, steps=20) if tiny else ICLConfig()
    if tiny:
        lengths, prompts = (6, 12), 200
    config = ICLConfig(**{**asdict(config), **{k: v for k, v in (("steps", steps), ("batch", batch)) if v is not None}})
    models, losses, stats, matrices, seconds, cpu_seconds = {}, {}, {}, {}, {}, {}
    for h in heads:
        name = f"{h} head" + ("s" if h > 1 else "")
        start, cpu_start = time.perf_counter(), time.process_time()
        progress = None if progress_factory is None else progress_factory(name)
        models[name], losses[name] = train(h, config, seed=seed, progress=progress)
        seconds[name], cpu_seconds[name] = time.perf_counter() - start, time.process_time() - cpu_start
        matrices[name] = kq_ov(models[name])
        stats[name] = pattern_stats(*matrices[name])
    rows = evaluate(models, lengths, config, prompts=prompts, seed=seed + 1000)
    os.makedirs(out, exist_ok=True)
    return dict(config=asdict(config), seed=seed, train_seconds=seconds, train_cpu_seconds=cpu_seconds, stats=stats,
                rows=rows,
                final_loss={k: sum(v[-100:]) / len(v[-100:]) for k, v in losses.items()}, losses=losses,
                kq={k: m[0].tolist() for k, m in matrices.items()}, ov={k: m[1].tolist() for k, m in matrices.items()},
                plots=[_plot_matrices(stats, matrices, os.path.join(out, "icl_regression_patterns.png")),
                       _plot_errors(rows, losses, config.n, os.path.join(out, "icl_regression_error.png"))])


def table(result: dict) -> str:
    """Markdown tables of the patterns per head and the errors per n."""
    lines = ["| model | head | omega | x-block off-diag share | diag spread | key-y row share | mu | "
             "OV last-entry share |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in result["stats"].items():
        for h, st in enumerate(s["heads"]):
            lines.append(f"| {name} | {h} | {st['omega']:+.3f} | {st['offdiag']:.3f} | {st['spread']:.3f} | "
                         f"{st['y_share']:.3f} | {st['mu']:+.3f} | {st['last_share']:.3f} |")
    lines.append("")
    lines.append("| model | sum mu / sum abs mu (zero-sum) | sum mu omega (effective GD step) | final train MSE | "
                 "train s (wall) | train s (CPU) |")
    lines.append("|---|---|---|---|---|---|")
    for name, s in result["stats"].items():
        lines.append(f"| {name} | {s['zero_sum']:.3f} | {s['effective_step']:+.3f} | "
                     f"{result['final_loss'][name]:.4f} | {result['train_seconds'][name]:.0f} | "
                     f"{result['train_cpu_seconds'][name]:.0f} |")
    lines.append("")
    rows = result["rows"]
    labels = [k for k in rows[0] if k != "n" and not k.endswith(" step")]
    lines.append("| n | " + " | ".join(labels) + " | tuned dgd step |")
    lines.append("|---|" + "---|" * (len(labels) + 1))
    for r in rows:
        lines.append(f"| {r['n']} | " + " | ".join(f"{r[k]:.4f}" for k in labels) +
                     f" | {r['debiased gd (tuned) step']:.3f} |")
    return "\n".join(lines)
