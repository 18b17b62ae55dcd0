"""onnxruntime alone: softplus forms on one stage-1-sized tensor (8, 384, 3136). python ort_softplus.py"""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto
def run(nodes, name):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("twenty", TensorProto.FLOAT, [], [20.0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = (np.random.randn(8, 384, 3136)*3).astype(np.float32)
    y = s.run(None, {"x": x})[0]
    ts=[]
    for i in range(5):
        t=time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter()-t)
    ref = np.logaddexp(0, x)
    print(f"{name:20s} {min(ts)*1e3:7.1f} ms  err {np.abs(y-ref).max():.2e}")
N = helper.make_node
run([N("Softplus", ["x"], ["y"])], "Softplus")
run([N("Exp", ["x"], ["e"]), N("Add", ["e","one"], ["p"]), N("Log", ["p"], ["y"])], "log(1+exp)")
run([N("Abs", ["x"], ["a"]), N("Neg", ["a"], ["n"]), N("Exp", ["n"], ["e"]), N("Add", ["e","one"], ["p"]), N("Log", ["p"], ["l"]), N("Relu", ["x"], ["r"]), N("Add", ["r","l"], ["y"])], "stable 7 ops")
run([N("Min", ["x", "twenty"], ["m"]), N("Exp", ["m"], ["e"]), N("Add", ["e","one"], ["p"]), N("Log", ["p"], ["l"]), N("Max", ["x", "l"], ["y"])], "kept: max(x, log(1+exp(min(x,20))))")
run([N("Relu", ["x"], ["y"])], "Relu (1 pass)")
run([N("Exp", ["x"], ["y"])], "Exp")
run([N("Log", ["x"], ["y"])], "Log")
