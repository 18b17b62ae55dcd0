"""Transpose nodes of an ONNX file in onnxruntime (2 threads, batch 8 at 224): ms per forward for the 14 largest, and their sum.

    python ort_transposes.py FILE.onnx
"""
import sys, os, tempfile, json, collections, numpy as np, onnxruntime as ort, onnx
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.enable_profiling = True
o.profile_file_prefix = os.path.join(tempfile.gettempdir(), "ort_transposes")   # not into the working folder
o.optimized_model_filepath = "/tmp/ort_transposes.opt.onnx"   # to read the perms after optimisation
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = np.random.randn(8,3,224,224).astype(np.float32)
for _ in range(3): s.run(None, {"x": x})
f = s.end_profiling(); ev = json.load(open(f))
t = collections.defaultdict(float); info = {}
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] == "Transpose":
        n = e["name"][:-12]; t[n] += e["dur"]/3e3; info[n] = e["args"].get("input_type_shape")
m = onnx.load(o.optimized_model_filepath, load_external_data=False)
perm = {n.name: [list(a.ints) for a in n.attribute if a.name == "perm"] for n in m.graph.node}
for n, v in sorted(t.items(), key=lambda kv: -kv[1])[:14]:
    print(f"{v:6.2f} ms {n:28s} {perm.get(n)} {info[n]}")
print("total", sum(t.values()))
