"""Per-depth table from kv_results.json files (merged): one row per policy, one column per depth (found/total)."""
import json, sys
parts = [json.load(open(p)) for p in sys.argv[1:]]
rows = {}
order = []
for part in parts:
    for r in part["rows"]:
        if r["policy"] not in rows:
            rows[r["policy"]] = []; order.append(r["policy"])
        rows[r["policy"]] += r["cells"]
depths = sorted({c["depth"] for cells in rows.values() for c in cells})
short = lambda p: p.replace("docs/bench/kv/", "").replace(",max_new=0", "")
print("| policy | " + " | ".join(f"{d:.3g}" for d in depths) + " | total | KV held / dense |")
print("|---|" + "---|" * (len(depths) + 2))
for p in order:
    cells = rows[p]
    if not cells:
        print(f"| {short(p)} | " + " | ".join("-" for _ in depths) + " | n/a | |"); continue
    col = []
    for d in depths:
        at = [c["found"] for c in cells if c["depth"] == d]
        col.append(f"{sum(at)}/{len(at)}")
    kv = sum(c["kv_fraction"] for c in cells) / len(cells)
    print(f"| {short(p)} | " + " | ".join(col) + f" | **{sum(c['found'] for c in cells)}/{len(cells)}** | {kv:.3f} |")
