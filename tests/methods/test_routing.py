"""Routing Transformer selection against a float64 loop implementation of online k-means routing."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.routing import RoutingTransformer


def naive_kmeans(q, k, *, num_clusters, decay, iterations, causal, segments=4):
    """Per (batch, head): unit vectors, centroids seeded at evenly spaced keys, EMA updates, argmax routing.
    Causal: the centroids stream over `segments` key segments (label C: a first-segment query)."""
    q, k = q.double(), k.double()
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    k_len = k.shape[2]
    offset = k_len - q_len
    out = []
    for b in range(batch):
        for h in range(heads):
            queries = [x / x.norm() for x in q[b, h]]
            keys = [x / x.norm() for x in k[b, h // group]]

            def nearest(x, centroids):
                return max(range(num_clusters), key=lambda c: (float(x @ centroids[c]), -c))

            def update(centroids, points):
                for _ in range(iterations):
                    sums = [torch.zeros_like(centroids[0]) for _ in centroids]
                    for x in points:
                        sums[nearest(x, centroids)] += x
                    moved = [decay * centroids[c] + (1 - decay) / 2 * sums[c] for c in range(num_clusters)]
                    centroids = [m / m.norm() for m in moved]
                return centroids

            if not causal:
                centroids = update([keys[s * k_len // num_clusters].clone() for s in range(num_clusters)],
                                   queries + keys)
                out.append(([nearest(x, centroids) for x in queries], [nearest(x, centroids) for x in keys]))
                continue
            size = min(k_len, max(-(-k_len // segments), num_clusters))
            centroids = [keys[s * size // num_clusters].clone() for s in range(num_clusters)]
            q_ids, k_ids = [num_clusters] * q_len, [None] * k_len
            for start in range(0, k_len, size):
                span = range(start, min(k_len, start + size))
                rows = [p - offset for p in span if p >= offset]
                if start > 0:  # routed with the centroids of the segments before
                    for i in rows:
                        q_ids[i] = nearest(queries[i], centroids)
                    for j in span:
                        k_ids[j] = nearest(keys[j], centroids)
                centroids = update(centroids, [queries[i] for i in rows] + [keys[j] for j in span])
                if start == 0:
                    for j in span:
                        k_ids[j] = nearest(keys[j], centroids)
            out.append((q_ids, k_ids))
    return out


def naive_routing_mask(q, k, *, num_clusters, decay, iterations, causal):
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    routes = naive_kmeans(q, k, num_clusters=num_clusters, decay=decay, iterations=iterations, causal=causal)
    mask = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool)
    for index, (q_ids, k_ids) in enumerate(routes):
        b, h = divmod(index, heads)
        for i in range(q_len):
            pos = i + k_len - q_len
            for j in range(k_len):
                same = q_ids[i] == k_ids[j] or q_ids[i] == num_clusters  # C: first segment, every key
                mask[b, h, i, j] = (same and (j <= pos or not causal)) or j == pos
    return mask


@pytest.mark.parametrize("q_len,k_len,clusters,iterations,causal,tile", [
    (120, 120, 6, 1, True, 32), (100, 100, None, 2, False, 16), (40, 130, 5, 3, True, 32), (64, 64, 1, 0, True, 16),
    (150, 150, 50, 1, True, 32)])
def test_token_mask_equals_naive_rule(q_len, k_len, clusters, iterations, causal, tile):
    g = torch.Generator().manual_seed(q_len + iterations)
    q, k = torch.randn(1, 4, q_len, 8, generator=g), torch.randn(1, 2, k_len, 8, generator=g)
    decay = 0.5  # a decay far from 1 makes the updates matter
    method = RoutingTransformer(num_clusters=clusters, decay=decay, iterations=iterations, causal=causal,
                                tile_size=tile)
    expected = naive_routing_mask(q, k, num_clusters=clusters or round(math.sqrt(k_len)), decay=decay,
                                  iterations=iterations, causal=causal)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


def test_within_cluster_only_and_online_update_moves_centroids():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 96, 8, generator=g), torch.randn(2, 3, 96, 8, generator=g)
    method = RoutingTransformer(num_clusters=4, decay=0.9, iterations=2, causal=False)
    q_ids, k_ids, centroids = method.clusters(q, k)
    mask = method.select(q, k).to_token_mask()
    same = q_ids.unsqueeze(-1) == k_ids.unsqueeze(-2)
    assert torch.equal(mask, same | torch.eye(96, dtype=torch.bool))
    _, _, seeds = RoutingTransformer(num_clusters=4, iterations=0).clusters(q, k)
    assert not torch.allclose(centroids, seeds)
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(()))


def test_defaults_on_smollm2_shapes_are_causal_and_exact():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 300, 64, generator=g) for h in (9, 3, 3))
    method = RoutingTransformer()
    mask = method.select(q, k).to_token_mask()
    assert not mask.triu(1).any() and mask.diagonal(dim1=-2, dim2=-1).all()
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    keys, values = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)


@pytest.mark.parametrize("params", [dict(num_clusters=0), dict(decay=1.0), dict(decay=-0.1), dict(iterations=-1),
                                    dict(tile_size=0), dict(causal="yes")])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        RoutingTransformer(**params)


def test_causal_centroids_use_no_later_token():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g)
    method = RoutingTransformer(num_clusters=8, decay=0.5, iterations=2)
    before = method.select(q, k).to_token_mask()
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 100:], k2[:, :, 100:] = torch.randn(2, 1, 2, 156, 8, generator=g)
    after = method.select(q2, k2).to_token_mask()
    assert torch.equal(before[..., :100, :], after[..., :100, :])  # no row before 100 changed
    assert not torch.equal(before, after)


def test_too_many_clusters():
    with pytest.raises(ValueError, match="num_clusters"):
        RoutingTransformer(num_clusters=50).select(torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4))
