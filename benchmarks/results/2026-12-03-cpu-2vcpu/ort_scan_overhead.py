"""onnxruntime Scan cost per iteration: a body of 1 or 12 Add nodes on a slice of 16 or 43008 floats (the (M, B, D) slice of every stage of vmamba-tiny at batch 8), 200 iterations, 2 threads.

    python ort_scan_overhead.py
"""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto
V = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["s", "n"] if n == "xs" else ["n"])
def build(nodes_per_iter):
    nodes = []
    prev = "h"
    for i in range(nodes_per_iter):
        nodes.append(helper.make_node("Add", [prev, "x"], [f"t{i}"])); prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["h_next"]))
    body = helper.make_graph(nodes, "b", [V("h"), V("x")], [V("h_next")])
    g = helper.make_graph([helper.make_node("Scan", ["h0", "xs"], ["hT"], body=body, num_scan_inputs=1)], "g",
                          [V("h0"), V("xs")], [V("hT")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
for n_nodes in (1, 12):
    for size in (16, 43008):
        s = build(n_nodes)
        h0 = np.zeros(size, np.float32); xs = np.random.randn(200, size).astype(np.float32)
        for _ in range(3): s.run(None, {"h0": h0, "xs": xs})
        t = time.perf_counter(); R = 20
        for _ in range(R): s.run(None, {"h0": h0, "xs": xs})
        dt = (time.perf_counter() - t) / R / 200
        print(f"nodes/iter {n_nodes:2d} slice {size:6d}: {dt*1e6:7.1f} us per iteration, {dt*1e6/(n_nodes+1):.1f} us per node")
