"""The SAE circuit rule against naive re-creations of the official code (charlieoneill11/sae-circuits):
src/sae.py + src/train.py's SAE and training loop, src/node.py's |U+| and src/main.py's training draw, each
written out plainly here (data/ioi.py's prompts: test_circuit_prompts.py)."""
import torch

from blockattn.analysis import circuits


class OfficialTiedBias(torch.nn.Module):
    def __init__(self, bias, subtract):
        super().__init__()
        self.bias, self.subtract = bias, subtract

    def forward(self, x):
        return x - self.bias if self.subtract else x + self.bias


class OfficialUnitNormLinear(torch.nn.Module):
    """src/sae.py ConstrainedUnitNormLinear: normalise rows in forward; backward hook removes the gradient
    component along each row."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone())
        self.weight.register_hook(self.hook)

    def hook(self, grad):
        dot = (grad * self.weight).sum(-1)
        normalized = self.weight / torch.norm(self.weight, dim=-1, keepdim=True)
        return grad - dot[:, None] * normalized

    def forward(self, x):
        with torch.no_grad():
            torch.nn.functional.normalize(self.weight, dim=-1, out=self.weight)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def official_sae(ours):
    bias = torch.nn.Parameter(ours.bias.detach().clone())
    model = torch.nn.Module()
    model.tied_bias = bias
    model.encoder = torch.nn.Sequential(OfficialTiedBias(bias, True),
                                        OfficialUnitNormLinear(ours.encoder.weight.detach(), ours.encoder.bias.detach()),
                                        torch.nn.ReLU())
    model.decoder = torch.nn.Sequential(OfficialUnitNormLinear(ours.decoder.weight.detach(), None),
                                        OfficialTiedBias(bias, False))
    return model


def official_train(model, x, epochs, lam=0.02, lr=1e-3):
    """src/train.py's loop and loss (the periodic eval forward renormalises too; the next forward would)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        acts = model.encoder(x)
        recon = model.decoder(acts)
        flat = acts.reshape(-1, acts.shape[-1])  # einops "b s n -> (b s) n"
        loss = torch.nn.functional.mse_loss(recon, x) + lam * torch.mean(torch.norm(flat, p=1, dim=1))
        loss.backward()
        opt.step()
    return model


def test_sae_training_equals_the_official_sae_and_loop():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 6, 24, generator=g) * 3
    epochs = 40
    init = circuits.CircuitSAE(24, 32, seed=4)
    naive = official_train(official_sae(init), x, epochs)
    ours = circuits.train_sae(x, features=32, epochs=epochs, seed=4)
    torch.testing.assert_close(ours.bias, naive.tied_bias, atol=1e-5, rtol=1e-4)
    for mine, theirs in ((ours.encoder, naive.encoder[1]), (ours.decoder, naive.decoder[0])):
        with torch.no_grad():
            torch.nn.functional.normalize(theirs.weight, dim=-1, out=theirs.weight)  # as its next forward
        torch.testing.assert_close(mine.weight, theirs.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.encoder.bias, naive.encoder[1].bias, atol=1e-5, rtol=1e-4)
    test = torch.randn(30, 6, 24, generator=g) * 3
    with torch.no_grad():
        want = naive.encoder(test).argmax(-1)  # main.py: np.argmax(learned_activations, axis=2)
    assert torch.equal(circuits.sae_codes(ours, test), want)


def official_unique(codes, normalise):
    """src/node.py unique_to_positives_and_negatives: halfway split, python sets per head."""
    halfway = codes.shape[0] // 2
    out = []
    for i in range(codes.shape[1]):
        positive, negative = set(codes[:halfway, i].tolist()), set(codes[halfway:, i].tolist())
        unique = len(positive - negative)
        out.append(unique / len(positive | negative) if normalise else unique)
    return out


def test_node_scores_are_the_official_unique_to_positive_count():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 12, (40, 17), generator=g)
    codes[:20, 3] = torch.randint(12, 20, (20,), generator=g)  # one head with positive-only codes
    for normalise in (False, True):
        got = circuits.node_scores(codes, 20, normalise=normalise)
        torch.testing.assert_close(got, torch.tensor(official_unique(codes, normalise), dtype=got.dtype))
    assert circuits.node_scores(codes, 20).argmax() == 3


def test_rank_heads_trains_on_the_official_draw(monkeypatch):
    """main.py prepare_data: the SAE sees the first `num_sae_examples` rows of a random permutation of the
    whole dataset (positives and negatives mixed)."""
    seen = []
    real = circuits.train_sae

    def spy(train, **kw):
        seen.append(train.clone())
        return real(train, **{**kw, "epochs": 2})
    monkeypatch.setattr(circuits, "train_sae", spy)
    x = torch.randn(30, 4, 8)
    circuits.rank_heads(x, 15, heads=2, seed=1)
    chosen = torch.randperm(30, generator=torch.Generator().manual_seed(1000))[:10]
    assert torch.equal(seen[0], x[chosen])
