"""Diagnostic plan (not MoA): the K KV heads with the highest retrieval score (max over the GQA group,
docs/bench/analysis_heads.json) keep everything (α=0, β=1); every other head a fixed window α (β=0), α the
largest multiple of 64 that keeps the mean density at 1 − ratio for an n-token context."""
import json, sys
import numpy as np
n, k = int(sys.argv[2]), 9
s = np.array(json.load(open("docs/bench/analysis_heads.json"))["scores"])     # [30, 9] query heads
kv = s.reshape(30, 3, 3).max(-1)                                                # [30, 3] KV heads (h // 3)
top = set(np.argsort(-kv.ravel())[:k].tolist())
spans = {}
for density in (0.5, 0.3):
    alpha = int((density * 90 * n - k * n) / (90 - k)) // 64 * 64
    spans[f"{density:.3g}"] = [[[0.0, 1.0] if l * 3 + h in top else [float(alpha), 0.0] for h in range(3)]
                               for l in range(30)]
    print(density, "window", alpha)
print("full heads (layer, kv head):", sorted(divmod(i, 3) for i in top))
json.dump({"method": "moa", "model": "smollm2-135m", "spans": spans,
           "deviations": f"diagnostic, not MoA: top-{k} retrieval KV heads whole, the rest a window sized for "
                         f"density 1 - ratio at n = {n}"}, open(sys.argv[1], "w"))
