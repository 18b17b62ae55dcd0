"""onnxruntime alone: Transpose / Pad / Concat / Mul on stage-1-sized tensors. python ort_ops.py"""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto, numpy_helper
def run(nodes, name, x, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": x}); ts=[]
    for i in range(5):
        t=time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter()-t)
    print(f"{name:30s} {min(ts)*1e3:7.1f} ms")
N = helper.make_node
x = np.random.randn(8, 384, 56, 56).astype(np.float32)
run([N("Transpose", ["x"], ["y"], perm=[3,0,1,2])], "transpose (B,KD,M,S)->(S,B,KD,M)", x)
run([N("Transpose", ["x"], ["y"], perm=[0,1,3,2])], "transpose last two", x)
run([N("Identity", ["x"], ["y"])], "identity", x)
x2 = np.random.randn(8, 384, 3136).astype(np.float32)
pads = numpy_helper.from_array(np.array([0,0,0,0,0,5], dtype=np.int64), "pads")
run([N("Pad", ["x", "pads"], ["y"])], "pad 5 at end", x2, [pads])
padz = numpy_helper.from_array(np.array([0,0,0,0,0,0], dtype=np.int64), "pads")
run([N("Pad", ["x", "pads"], ["y"])], "pad 0", x2, [padz])
blk = numpy_helper.from_array(np.zeros((8,384,5), dtype=np.float32), "blk")
run([N("Concat", ["x", "blk"], ["y"], axis=-1)], "concat 5", x2, [blk])
run([N("Mul", ["x", "x"], ["y"])], "mul", x2)
