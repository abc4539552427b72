"""Routing Transformer selection against a float64 loop implementation of online k-means routing."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.routing import RoutingTransformer


def naive_kmeans(q, k, *, num_clusters, decay, iterations, causal, tile, segments=4, assignment="nearest",
                 kmeans_iterations=0):
    """Per (batch, head): unit vectors, centroids seeded at evenly spaced keys, batch k-means, EMA
    updates, then each token's set of clusters: its argmax ("nearest") or the clusters whose top-w it
    is in ("balanced", lucidrains' distribution()). Causal: the centroids stream over `segments` key
    segments (cluster C: a first-segment query, which sees every earlier key)."""
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

            def init(centroids, points):
                for _ in range(kmeans_iterations):
                    members = [[x for x in points if nearest(x, centroids) == c] for c in range(num_clusters)]
                    centroids = [sum(m) / sum(m).norm() if m else centroids[c] for c, m in enumerate(members)]
                return update(centroids, points)

            def assign(points, centroids):
                if assignment == "nearest":
                    return [{nearest(x, centroids)} for x in points]
                sets = [set() for _ in points]
                width = min(len(points), -(-len(points) // num_clusters))
                for c in range(num_clusters):
                    ranked = sorted(range(len(points)), key=lambda i: float(points[i] @ centroids[c]), reverse=True)
                    for i in ranked[:width]:
                        sets[i].add(c)
                return sets

            if not causal:
                centroids = init([keys[s * k_len // num_clusters].clone() for s in range(num_clusters)],
                                 queries + keys)
                out.append((assign(queries, centroids), assign(keys, centroids)))
                continue
            size = max(-(-k_len // segments), num_clusters)
            size = min(k_len, -(-size // tile) * tile)  # segments of whole tiles
            centroids = [keys[s * size // num_clusters].clone() for s in range(num_clusters)]
            q_sets, k_sets = [{num_clusters}] * q_len, [None] * k_len
            for start in range(0, k_len, size):
                span = list(range(start, min(k_len, start + size)))
                rows = [p - offset for p in span if p >= offset]
                points = [queries[i] for i in rows] + [keys[j] for j in span]
                if start > 0:  # routed with the centroids of the segments before
                    for i, got in zip(rows, assign([queries[i] for i in rows], centroids)):
                        q_sets[i] = got
                    for j, got in zip(span, assign([keys[j] for j in span], centroids)):
                        k_sets[j] = got
                    centroids = update(centroids, points)
                else:
                    centroids = init(centroids, points)
                    for j, got in zip(span, assign([keys[j] for j in span], centroids)):
                        k_sets[j] = got
            out.append((q_sets, k_sets))
    return out


def naive_routing_mask(q, k, *, num_clusters, decay, iterations, causal, tile, **rule):
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    routes = naive_kmeans(q, k, num_clusters=num_clusters, decay=decay, iterations=iterations, causal=causal,
                          tile=tile, **rule)
    mask = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool)
    for index, (q_sets, k_sets) in enumerate(routes):
        b, h = divmod(index, heads)
        for i in range(q_len):
            pos = i + k_len - q_len
            for j in range(k_len):
                same = bool(q_sets[i] & k_sets[j]) or num_clusters in q_sets[i]  # C: first segment, every key
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
                                tile_size=tile, assignment="nearest", kmeans_iterations=0)
    expected = naive_routing_mask(q, k, num_clusters=clusters or round(math.sqrt(k_len)), decay=decay,
                                  iterations=iterations, causal=causal, tile=tile)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


@pytest.mark.parametrize("q_len,k_len,clusters,causal,tile", [
    (120, 120, 6, True, 32), (100, 100, None, False, 16), (40, 130, 5, True, 32), (150, 150, 12, True, 16)])
def test_balanced_token_mask_equals_naive_rule(q_len, k_len, clusters, causal, tile):
    g = torch.Generator().manual_seed(q_len + 11)
    q, k = torch.randn(1, 4, q_len, 8, generator=g), torch.randn(1, 2, k_len, 8, generator=g)
    method = RoutingTransformer(num_clusters=clusters, decay=0.5, iterations=1, causal=causal, tile_size=tile,
                                kmeans_iterations=3)
    expected = naive_routing_mask(q, k, num_clusters=clusters or round(math.sqrt(k_len)), decay=0.5, iterations=1,
                                  causal=causal, tile=tile, assignment="balanced", kmeans_iterations=3)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


def test_balanced_clusters_have_equal_sizes_nearest_do_not():
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 2, 1024, 16, generator=g), torch.randn(1, 2, 1024, 16, generator=g)
    q_in, k_in = RoutingTransformer(num_clusters=32, causal=False).memberships(q, k)
    assert (k_in[..., :32].sum(2) == 32).all() and (q_in[..., :32].sum(2) == 32).all()  # top-w, w = 1024 / 32
    q_in, k_in = RoutingTransformer(num_clusters=32, causal=False, assignment="nearest").memberships(q, k)
    sizes = k_in[..., :32].sum(2)
    assert (k_in[..., :32].sum(-1) == 1).all() and sizes.max() > sizes.min()


def test_within_cluster_only_and_online_update_moves_centroids():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 96, 8, generator=g), torch.randn(2, 3, 96, 8, generator=g)
    method = RoutingTransformer(num_clusters=4, decay=0.9, iterations=2, causal=False, assignment="nearest",
                                kmeans_iterations=0)
    q_ids, k_ids, centroids = method.clusters(q, k)
    mask = method.select(q, k).to_token_mask()
    same = q_ids.unsqueeze(-1) == k_ids.unsqueeze(-2)
    assert torch.equal(mask, same | torch.eye(96, dtype=torch.bool))
    _, _, seeds = RoutingTransformer(num_clusters=4, iterations=0, kmeans_iterations=0).clusters(q, k)
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
                                    dict(tile_size=0), dict(causal="yes"), dict(assignment="argmax"),
                                    dict(kmeans_iterations=-1)])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        RoutingTransformer(**params)


@pytest.mark.parametrize("assignment,changed", [("nearest", 100), ("balanced", 128)])
def test_causal_centroids_use_no_later_token(assignment, changed):
    # nearest: no row before any position depends on later tokens; balanced decides a segment's
    # memberships together (top-w), so that holds at segment boundaries (4 segments of 64 here)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g)
    method = RoutingTransformer(num_clusters=8, decay=0.5, iterations=2, assignment=assignment)
    before = method.select(q, k).to_token_mask()
    q2, k2 = q.clone(), k.clone()
    q2[:, :, changed:], k2[:, :, changed:] = torch.randn(2, 1, 2, 256 - changed, 8, generator=g)
    after = method.select(q2, k2).to_token_mask()
    assert torch.equal(before[..., :changed, :], after[..., :changed, :])  # no row before it changed
    assert not torch.equal(before, after)


def test_too_many_clusters():
    with pytest.raises(ValueError, match="num_clusters"):
        RoutingTransformer(num_clusters=50).select(torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4))
