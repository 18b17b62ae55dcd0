"""The largest nodes of the newest onnxruntime_profile_*.json in the current folder: python ort_profile_by_node.py OPTYPE ..."""
import sys, json, glob, os, collections
f = sorted(glob.glob("onnxruntime_profile_*.json"), key=os.path.getmtime)[-1]
ev = json.load(open(f))
by = collections.defaultdict(list)
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] in sys.argv[1:]:
        by[e["name"]].append(e["dur"])
for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:12]:
    print(f"{k[:70]:70s} n={len(v)} mean {sum(v)/len(v)/1e3:.2f} ms")
