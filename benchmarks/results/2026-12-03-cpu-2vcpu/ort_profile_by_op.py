"""onnxruntime profile of an ONNX file (batch 8, 224, 2 threads), ms per run by op type: python ort_profile_by_op.py FILE.onnx prof"""
import sys, json, time, collections, numpy as np, onnxruntime as ort, torch
path = sys.argv[1]
so = ort.SessionOptions(); so.intra_op_num_threads = 2
if "prof" in sys.argv: so.enable_profiling = True
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.random.randn(8,3,224,224).astype(np.float32)
name = s.get_inputs()[0].name
s.run(None, {name: x})
ts=[]
for i in range(3):
    t=time.perf_counter(); s.run(None, {name: x}); ts.append(time.perf_counter()-t)
print("ort", sorted(ts))
if "prof" in sys.argv:
    f = s.end_profiling()
    ev = json.load(open(f))
    by = collections.Counter(); tot = 0
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]; tot += e["dur"]
    for k, v in by.most_common(25): print(f"{k:28s} {v/1e3/4:8.1f} ms/run {100*v/tot:5.1f}%")
