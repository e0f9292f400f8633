"""Compare a ranker run with the default run: logged detector losses per iteration, and the
detector's weights bit for bit (every key of the default checkpoint).

Usage (issue 13, third pass; output in seed*/compare_to_default.txt):
    python docs/benchmarks/issue13_ranker/compare_to_default.py output/a13_rank_s1 \
        /work/main/output/demo/gridclip   # seeds 2, 3: /work/main/output/seeds/default_s<s>
"""
import json, sys, torch
mine, ref = sys.argv[1], sys.argv[2]
def rows(d):
    out = {}
    for line in open(f"{d}/metrics.json"):
        r = json.loads(line)
        if "iteration" in r and "loss_cls" in r:
            out[r["iteration"]] = r
    return out
a, b = rows(mine), rows(ref)
common = sorted(set(a) & set(b))
keys = [k for k in b[common[0]] if k.startswith("loss_")]
same = all(a[i][k] == b[i][k] for i in common for k in keys)
print(f"logged iterations compared: {len(common)} ({common[0]}..{common[-1]}), keys {keys}: identical={same}")
if not same:
    for i in common:
        for k in keys:
            if a[i][k] != b[i][k]:
                print("  differs", i, k, a[i][k], b[i][k]); break
wa = torch.load(f"{mine}/model_final.pth", map_location="cpu", weights_only=False)["model"]
wb = torch.load(f"{ref}/model_final.pth", map_location="cpu", weights_only=False)["model"]
diff = [k for k in wb if not torch.equal(torch.as_tensor(wa[k]), torch.as_tensor(wb[k]))]
print(f"detector tensors compared: {len(wb)}, differing: {len(diff)} {diff[:5]}; extra keys in mine: {sorted(set(wa) - set(wb))}")
