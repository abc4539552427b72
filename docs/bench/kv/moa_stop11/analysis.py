"""Stop 11, MoA item 2: which KV heads get long spans, are they the retrieval heads, does the passkey needle
survive in any head's cache. Usage: analysis.py INFLUENCE.pt PLAN.json [PLAN.json ...]"""
import json, sys
import numpy as np, torch
from blockattn.kv import moa
from blockattn.kv.streaming import _sink_and_recent
from blockattn.bench import tasks

def spearman(a, b):
    from scipy.stats import spearmanr     # average ranks for ties (a uniform plan has no correlation: nan)
    r = spearmanr(a, b).statistic
    return float(r)

scores = np.array(json.load(open("docs/bench/analysis_heads.json"))["scores"])
kvs = scores.reshape(30, 3, 3).max(-1).ravel()            # per KV head: max retrieval score of its group
top9 = set(np.argsort(-kvs)[:9].tolist())
print("top-9 retrieval KV heads:", sorted(divmod(i, 3) for i in top9))

inf = torch.load(sys.argv[1])
for n, z in sorted(inf.items()):
    nb = z.shape[-1]
    flat = z.flatten(0, 1).double()
    tot = flat.sum((1, 2))
    for w in sorted({nb // 4, nb // 2} - {0}):
        far = 1 - (flat * moa.block_layout(w * 64, 0.0, nb).double()).sum((1, 2)) / tot
        f = far.numpy()
        order = np.argsort(-f)
        print(f"profile {n}: influence outside a {w*64}-token window + sink: median {np.median(f):.3f}; "
              f"Spearman vs retrieval {spearman(f, kvs):+.2f}; top-9 far heads {sorted(divmod(int(i),3) for i in order[:9])}; "
              f"overlap with top-9 retrieval {len(top9 & set(order[:9].tolist()))}/9")

import blockattn
model, tok = blockattn.models.load("smollm2-135m")
q_len = len(tok(" " + tasks.QUESTION.strip(), add_special_tokens=False).input_ids)
depths = [i / 8 for i in range(9)]
needle = {}
for d in depths:
    s = tasks.passkey(tok, 8000, d, seed=0, model=model)
    ids = s.prompt[0, :-q_len].tolist()
    key = s.answer[0].tolist()
    at = next(i for i in range(len(ids)) if ids[i:i + len(key)] == key)
    needle[d] = (len(ids), at, at + len(key))
print("passkey 8000 contexts: n, key token span per depth:", {d: needle[d] for d in depths})

class Cfg:
    num_hidden_layers, num_key_value_heads = 30, 3
for path in sys.argv[2:]:
    for ratio in (0.5, 0.7):
        try:
            policy = moa.MoA(plan=None if path == 'uniform' else path, ratio=ratio, max_new=0)
            policy.setup(model, None)
        except ValueError as e:
            print(path, ratio, e); continue
        n = needle[0.5][0]
        sizes = np.array([s for l in range(30) for s in policy.sizes(l, 3, n)])
        full = sizes >= n
        print(f"\n{path.split('/')[-1]} ratio {ratio}: mean kept {sizes.mean() / n:.3f}; heads whole {int(full.sum())}; "
              f"whole heads by layer {sorted(set(int(i) // 3 for i in np.nonzero(full)[0]))}; "
              f"Spearman(span, retrieval) {spearman(sizes, kvs):+.2f}; top-9 retrieval heads' spans "
              f"{[int(sizes[i]) for i in sorted(top9)]}")
        row = []
        for d in depths:
            n, a, b = needle[d]
            keep = [set(_sink_and_recent(n, min(64, int(S)), int(S), 'cpu')[0].tolist()) if S < n else None
                    for S in sizes]
            has = [k is None or all(t in k for t in range(a, b)) for k in keep]
            row.append(f"{d:.3g}: {sum(has)} heads ({sum(has[i] for i in top9)}/9 retrieval)")
        print("  needle kept in: " + "; ".join(row))
