"""Multi-needle 2k (3 needles): how many KV heads (and of the top-9 retrieval heads) keep each needle's value."""
import json, numpy as np
import blockattn
from blockattn.bench import tasks, kv_eval
from blockattn.kv import moa
from blockattn.kv.streaming import _sink_and_recent
model, tok = blockattn.models.load("smollm2-135m")
scores = np.array(json.load(open("docs/bench/analysis_heads.json"))["scores"])
kvs = scores.reshape(30, 3, 3).max(-1).ravel(); top9 = set(np.argsort(-kvs)[:9].tolist())
s0 = tasks.multi_needle(tok, 2048, needles=3, ask=0, seed=0, model=model)
cut = s0.prompt.shape[1] - kv_eval.question_length(tok, s0.prompt[0]); ids = s0.prompt[0, :cut].tolist(); n = len(ids)
spans = []
for ask in range(3):
    s = tasks.multi_needle(tok, 2048, needles=3, ask=ask, seed=0, model=model)
    v = s.answer[0].tolist(); at = next(i for i in range(n) if ids[i:i + len(v)] == v); spans.append((at, at + len(v)))
print("n", n, "value spans", spans)
from scipy.stats import spearmanr
for path in ["uniform", "docs/bench/kv/moa_plan_smollm2_2k.json", "docs/bench/kv/moa_plan_smollm2_2k_retrieval_oracle.json"]:
    for ratio in (0.5, 0.7):
        p = moa.MoA(plan=None if path == "uniform" else path, ratio=ratio, max_new=0); p.setup(model, None)
        sizes = np.array([x for l in range(30) for x in p.sizes(l, 3, n)])
        keep = [set(_sink_and_recent(n, min(64, int(S)), int(S), "cpu")[0].tolist()) for S in sizes]
        out = []
        for a, b in spans:
            has = [all(t in k for t in range(a, b)) for k in keep]
            out.append(f"{sum(has)} ({sum(has[i] for i in top9)}/9)")
        rho = spearmanr(sizes, kvs).statistic
        print(f"{path.split('/')[-1]} {ratio}: kept {sizes.mean()/n:.3f}, Spearman(span, retrieval) {rho:+.2f}; "
              f"heads keeping needle 1/2/3 (retrieval): {', '.join(out)}; top-9 retrieval spans {[int(sizes[i]) for i in sorted(top9)]}")
