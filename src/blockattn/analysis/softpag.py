"""SoftPAG and HeadHunter: head-level attention perturbation guidance for diffusion transformers.

Ahn, Kang, Lee, Kim, Min, Jang, Lee, Paul, Hong, Kim, "Fine-Grained Perturbation Guidance via Attention
Head Selection" (arXiv 2506.10978), on PAG (Ahn et al., "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance", ECCV 2024). No official code is public; the rules below are the paper's.
- SoftPAG: a selected head's attention map A becomes (1 - u) A + u I, u in [0, 1]. Since the output is
  A V, that head's output is (1 - u) softmax(QK^T) V + u V: here the engine's dense layout and its
  diagonal layout (each query sees only itself, whose output is V), mixed per head.
- PAG guidance with the perturbed model as the weak branch: eps^ = eps + w (eps - eps~).
- HeadHunter: greedy, iterative selection of the head set S maximising an objective; each round scores
  every head h not in S by generating with S + {h} perturbed (fixed seeds) and adds the best. The
  paper's objective is a reward model; here (no reward model offline) the confidence of a small
  classifier trained here, with a feature Frechet distance reported beside it. Its round count and
  sample counts are this file's choices (the paper's are not public).

`experiment` is the demonstration on this CPU: a TinyDiT (`blockattn.modules.tiny_dit`) trained on
sklearn's 8x8 digits, an MLP classifier trained on the same split, HeadHunter rounds, and a SoftPAG
strength sweep for the selected heads, all heads, and as many random heads.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time

import torch
from torch import Tensor, nn

import blockattn
from blockattn._checks import check_float_tensors, int_arg, number_arg
from blockattn.patterns import full, sliding_window

__all__ = ["softpag_attention", "perturbed", "head_hunter", "NoiseSchedule", "ddim_sample", "DigitClassifier",
           "frechet_distance", "quality", "experiment", "table"]


@functools.lru_cache(maxsize=32)
def _layouts(length: int):
    # the diagonal layout (window 1, causal): every query attends to itself alone, so its output is V
    return full(length), sliding_window(length, window=1, causal=True)


def softpag_attention(q: Tensor, k: Tensor, v: Tensor, strength, *, backend: str = "auto") -> Tensor:
    """Self-attention `q, k, v [B, H, L, D]` whose head h attends with (1 - u_h) A_h + u_h I.

    `strength` is a float or a tensor `[H]` of u_h in [0, 1]; heads with u_h = 0 are bit-identical to
    plain attention, and when every u_h is 0 the diagonal branch is not run at all.
    """
    check_float_tensors(("q", q), ("k", k), ("v", v))
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, H, L, D] (self-attention), got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    heads, length = q.shape[1], q.shape[2]
    if isinstance(strength, Tensor):
        if strength.shape != (heads,):
            raise ValueError(f"strength must be a float or a tensor [H] = [{heads}], got {list(strength.shape)}")
        u = strength.to(device=q.device, dtype=q.dtype)
    else:
        u = torch.full((heads,), number_arg("strength", strength), device=q.device, dtype=q.dtype)
    if bool(((u < 0) | (u > 1)).any()):
        raise ValueError(f"strength must lie in [0, 1], got {u.tolist()}")
    dense, diagonal = _layouts(length)
    out = blockattn.attention(q, k, v, dense.to(q.device), backend=backend)
    if not bool(u.any()):
        return out
    identity = blockattn.attention(q, k, v, diagonal.to(q.device), backend=backend)
    # lerp is exact at both ends: u = 0 gives `out`, u = 1 gives the identity branch
    return torch.lerp(out, identity, u.view(1, heads, 1, 1))


@contextlib.contextmanager
def perturbed(model: nn.Module, heads, strength: float = 1.0):
    """Within the block, each `(layer, head)` in `heads` of `model.attention_layers()` attends with
    SoftPAG strength `strength`; the previous strengths come back on exit."""
    strength = number_arg("strength", strength, low=0.0, high=1.0)
    layers = model.attention_layers()
    saved = [layer.identity_strength.clone() for layer in layers]
    try:
        for layer, head in heads:
            if not (0 <= layer < len(layers) and 0 <= head < layers[layer].heads):
                raise ValueError(f"head ({layer}, {head}) is not in a model of {len(layers)} layers x "
                                 f"{layers[0].heads} heads")
            layers[layer].identity_strength[head] = strength
        yield model
    finally:
        for layer, old in zip(layers, saved):
            layer.identity_strength.copy_(old)


def head_hunter(candidates, objective, *, rounds: int, per_round: int = 1) -> dict:
    """Greedy selection: each round scores `objective(selected + [h])` for every candidate h not yet
    selected and adds the `per_round` best. Returns `selected` (in order) and each round's scores."""
    rounds, per_round = int_arg("rounds", rounds), int_arg("per_round", per_round)
    candidates = list(candidates)
    if rounds * per_round > len(candidates):
        raise ValueError(f"rounds * per_round must be <= {len(candidates)} candidates, got {rounds * per_round}")
    selected, history = [], []
    for _ in range(rounds):
        scores = {h: float(objective(selected + [h])) for h in candidates if h not in selected}
        best = sorted(scores, key=scores.get, reverse=True)[:per_round]
        selected += best
        history.append(dict(added=best, score=scores[best[0]], scores=scores))
    return dict(selected=selected, history=history)


# --------------------------------------------------------------------------------------------- diffusion

class NoiseSchedule:
    """DDPM's linear beta schedule (1e-4 to 0.02 over 1000 steps), eps-prediction loss, DDIM (eta = 0) steps."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.steps = int_arg("steps", steps)
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0).float()

    def loss(self, model: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        a = self.alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1)
        return (model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise).pow(2).mean()


@torch.no_grad()
def ddim_sample(model: nn.Module, schedule: NoiseSchedule, count: int, *, steps: int = 25, guidance: float = 0.0,
                heads=(), strength: float = 1.0, seed: int = 0) -> Tensor:
    """`count` images by deterministic DDIM from seeded noise. With `guidance` w > 0 and `heads`, the
    prediction is PAG's eps + w (eps - eps~), eps~ from the model with `heads` SoftPAG-perturbed."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    shape = (count, model.channels, model.image_size, model.image_size)
    x = torch.randn(shape, generator=generator).to(device)
    times = torch.linspace(schedule.steps - 1, 0, steps).round().long().tolist()
    alpha_bar = schedule.alpha_bar.to(device)
    guided = guidance > 0 and len(heads) > 0 and strength > 0
    for i, t in enumerate(times):
        tt = torch.full((count,), t, device=device, dtype=torch.long)
        eps = model(x, tt)
        if guided:
            with perturbed(model, heads, strength):
                eps = eps + guidance * (eps - model(x, tt))
        a, a_prev = alpha_bar[t], (alpha_bar[times[i + 1]] if i + 1 < len(times) else torch.ones((), device=device))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ quality

class DigitClassifier(nn.Module):
    """MLP on the 64 pixels; `features` (the 32-wide penultimate layer) feed the Frechet distance."""

    def __init__(self, pixels: int = 64, hidden: int = 256, feature_dim: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim),
                                  nn.ReLU())
        self.out = nn.Linear(feature_dim, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))


def _sqrtm_psd(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature rows `a [N, F]` and `b [M, F]` (FID's formula)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


@torch.no_grad()
def quality(classifier: DigitClassifier, images: Tensor, reference: Tensor) -> dict:
    """Mean top-class probability of `images` (how clearly each is some digit), the Frechet distance of their
    classifier features to `reference` images', and the share of each predicted class's largest bin."""
    probs = classifier(images).softmax(-1)
    counts = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).float()
    return dict(confidence=float(probs.max(-1).values.mean()),
                fd=frechet_distance(classifier.features(images), classifier.features(reference)),
                top_class_share=float(counts.max() / counts.sum()))


def load_digits_split(seed: int = 0, held_out: int = 297) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's bundled 8x8 digits in [-1, 1] as `[N, 1, 8, 8]`, split (seeded) into train and held-out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = order[:held_out], order[held_out:]
    return images[train], labels[train], images[test], labels[test]


# --------------------------------------------------------------------------------------------- experiment

def train_classifier(images: Tensor, labels: Tensor, *, steps: int = 300, seed: int = 0) -> DigitClassifier:
    """Full-batch Adam (lr 3e-3, weight decay 1e-4) with pixel-noise augmentation, so generated digits with
    a little residual noise are judged by their shape."""
    torch.manual_seed(seed)
    model = DigitClassifier(pixels=images[0].numel())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noisy = images + 0.1 * torch.randn(images.shape, generator=generator)
        loss = nn.functional.cross_entropy(model(noisy), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def train_dit(images: Tensor, schedule: NoiseSchedule, *, steps: int = 3000, batch: int = 128, lr: float = 2e-3,
              ema: float = 0.995, seed: int = 0, progress=None, **dit_options):
    """AdamW on the eps-prediction loss (cosine-decayed lr), returning the EMA weights' model and the losses."""
    import copy

    from blockattn.modules.tiny_dit import TinyDiT

    torch.manual_seed(seed)
    model = TinyDiT(image_size=images.shape[-1], channels=images.shape[1], **dit_options)
    average = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(images), (batch,), generator=generator)
        loss = schedule.loss(model, images[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule_lr.step()
        with torch.no_grad():
            decay = min(ema, (step + 1) / (step + 10))  # a short warm-up of the average
            for p_avg, p in zip(average.parameters(), model.parameters()):
                p_avg.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return average.eval(), losses


def experiment(*, steps: int | None = None, batch: int | None = None, guidance: float = 2.0,
               strengths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), rounds: int = 3, hunt_samples: int = 256,
               samples: int = 512, sample_steps: int = 20, seed: int = 0, tiny: bool = False, out: str = ".",
               progress_factory=None) -> dict:
    """The CPU demonstration (see the module docstring); writes `softpag_sweep.png` and `softpag_samples.png`."""
    import os

    if tiny:
        steps, batch, rounds, hunt_samples, samples, sample_steps = steps or 3, batch or 8, 1, 8, 16, 3
        strengths = (0.0, 1.0)
    steps, batch = steps or 3000, batch or 128
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    classifier = train_classifier(train_x, train_y, steps=20 if tiny else 300, seed=seed)
    with torch.no_grad():
        accuracy = float((classifier(test_x).argmax(-1) == test_y).float().mean())
    schedule = NoiseSchedule()
    progress = None if progress_factory is None else progress_factory("tiny DiT")
    model, losses = train_dit(train_x, schedule, steps=steps, batch=batch, seed=seed, progress=progress)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    layers, heads = model.depth, model.heads
    candidates = [(layer, head) for layer in range(layers) for head in range(heads)]

    def objective(head_set):
        images = ddim_sample(model, schedule, hunt_samples, steps=sample_steps, guidance=guidance, heads=head_set,
                             seed=seed + 7)
        return quality(classifier, images, test_x)["confidence"]

    start = time.perf_counter()
    hunt = head_hunter(candidates, objective, rounds=rounds)
    hunt_seconds = time.perf_counter() - start
    shuffled = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed + 3)).tolist()
    head_sets = {"HeadHunter": hunt["selected"], "random": [candidates[i] for i in shuffled[:rounds]],
                 "all heads": candidates}
    start = time.perf_counter()
    sweep = {}
    for name, head_set in head_sets.items():
        sweep[name] = []
        for u in strengths:
            images = ddim_sample(model, schedule, samples, steps=sample_steps, guidance=guidance, heads=head_set,
                                 strength=u, seed=seed + 11)
            sweep[name].append(dict(strength=u, **quality(classifier, images, test_x)))
    sweep_seconds = time.perf_counter() - start
    reference = dict(real_held_out=quality(classifier, test_x, test_x),
                     real_train=quality(classifier, train_x[:len(test_x)], test_x))
    os.makedirs(out, exist_ok=True)
    grids = {f"u = {u}": ddim_sample(model, schedule, 32, steps=sample_steps, guidance=guidance,
                                    heads=hunt["selected"], strength=u, seed=seed + 11)
             for u in (strengths[0], strengths[len(strengths) // 2], strengths[-1])}
    result = dict(seed=seed, steps=steps, batch=batch, guidance=guidance, samples=samples, hunt_samples=hunt_samples,
                  sample_steps=sample_steps, classifier_accuracy=accuracy, train_seconds=train_seconds,
                  train_cpu_seconds=train_cpu, hunt_seconds=hunt_seconds, sweep_seconds=sweep_seconds,
                  final_loss=sum(losses[-50:]) / len(losses[-50:]),
                  hunt=dict(selected=[list(h) for h in hunt["selected"]],
                            history=[dict(added=[list(h) for h in r["added"]], score=r["score"],
                                          scores={f"{h[0]}.{h[1]}": s for h, s in r["scores"].items()})
                                     for r in hunt["history"]]),
                  head_sets={k: [list(h) for h in v] for k, v in head_sets.items()}, sweep=sweep, reference=reference)
    result["plots"] = [_plot_sweep(result, losses, (layers, heads), os.path.join(out, "softpag_sweep.png")),
                       _plot_samples(grids, os.path.join(out, "softpag_samples.png"))]
    return result


def _plot_sweep(result: dict, losses: list, shape: tuple[int, int], path: str) -> str:
    from blockattn.plots import figure, save

    fig, axes = figure(1, 4, figsize=(17, 3.8))
    ax_loss, ax_hunt, ax_conf, ax_fd = axes[0]
    smooth = max(1, len(losses) // 100)
    points = [sum(losses[i:i + smooth]) / len(losses[i:i + smooth]) for i in range(0, len(losses), smooth)]
    ax_loss.plot([i * smooth for i in range(len(points))], points)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DiT eps MSE")
    first = result["hunt"]["history"][0]["scores"]
    grid = torch.zeros(shape)
    for key, score in first.items():
        layer, head = map(int, key.split("."))
        grid[layer, head] = score
    image = ax_hunt.imshow(grid.numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax_hunt, fraction=0.046)
    ax_hunt.set_xlabel("head")
    ax_hunt.set_ylabel("layer")
    ax_hunt.set_title("HeadHunter round 1: confidence\nwith one head perturbed (u = 1)", fontsize=9)
    for name, rows in result["sweep"].items():
        label = f"{name} ({len(result['head_sets'][name])} heads)"
        ax_conf.plot([r["strength"] for r in rows], [r["confidence"] for r in rows], marker="o", label=label)
        ax_fd.plot([r["strength"] for r in rows], [r["fd"] for r in rows], marker="o", label=label)
    ax_conf.axhline(result["reference"]["real_held_out"]["confidence"], color="grey", linestyle=":",
                    label="real held-out digits")
    ax_fd.axhline(result["reference"]["real_train"]["fd"], color="grey", linestyle=":", label="real train vs held-out")
    for ax, label in ((ax_conf, "classifier confidence (higher: clearer digits)"),
                      (ax_fd, "feature Frechet distance to held-out")):
        ax.set_xlabel(f"SoftPAG strength u (guidance w = {result['guidance']})")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("SoftPAG on a tiny DiT trained on 8x8 digits")
    return save(fig, path)


def _plot_samples(grids: dict, path: str) -> str:
    from blockattn.plots import figure, save

    fig, axes = figure(1, len(grids), figsize=(3.6 * len(grids), 3.9))
    for ax, (name, images) in zip(axes[0], grids.items()):
        rows = images[:32].view(4, 8, 8, 8).permute(0, 2, 1, 3).reshape(32, 64)
        ax.imshow(rows.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"HeadHunter heads, SoftPAG {name}", fontsize=9)
        ax.axis("off")
    return save(fig, path)


def table(result: dict) -> str:
    """Markdown: the HeadHunter rounds and the strength sweep per head set."""
    lines = [f"classifier held-out accuracy {result['classifier_accuracy']:.3f}; DiT {result['steps']} steps of "
             f"{result['batch']} (final eps MSE {result['final_loss']:.4f}), classifier + DiT training "
             f"{result['train_seconds']:.0f} s wall / {result['train_cpu_seconds']:.0f} s CPU; HeadHunter "
             f"{result['hunt_seconds']:.0f} s, sweep {result['sweep_seconds']:.0f} s; "
             f"guidance w = {result['guidance']}, "
             f"{result['sample_steps']} DDIM steps", "",
             "| round | head added (layer.head) | confidence | best / median / worst candidate |", "|---|---|---|---|"]
    for i, r in enumerate(result["hunt"]["history"]):
        values = sorted(r["scores"].values())
        added = ", ".join(f"{h[0]}.{h[1]}" for h in r["added"])
        lines.append(f"| {i + 1} | {added} | {r['score']:.4f} | {values[-1]:.4f} / {values[len(values) // 2]:.4f} / "
                     f"{values[0]:.4f} |")
    lines += ["", "| heads perturbed | u | confidence | feature FD | largest class share |", "|---|---|---|---|---|"]
    for name, rows in result["sweep"].items():
        heads = ", ".join(f"{h[0]}.{h[1]}" for h in result["head_sets"][name]) if len(result["head_sets"][name]) < 6 \
            else f"{len(result['head_sets'][name])} heads"
        for r in rows:
            lines.append(f"| {name} ({heads}) | {r['strength']:.2f} | {r['confidence']:.4f} | {r['fd']:.3f} | "
                         f"{r['top_class_share']:.3f} |")
    for name, q in result["reference"].items():
        lines.append(f"| {name.replace('_', ' ')} (reference) | - | {q['confidence']:.4f} | {q['fd']:.3f} | "
                     f"{q['top_class_share']:.3f} |")
    return "\n".join(lines)
