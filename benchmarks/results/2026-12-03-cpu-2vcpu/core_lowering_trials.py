"""Trials of the whole-SS2D-core ONNX lowering (the prototype of vmamba_cli/export.py at 3cbea00).

The prototype keeps the N axis for d_state 1, and has two switches for the variants in the README's
"Tried and dropped" table: --one-transpose (x moved to each step-major copy by one N-d transpose)
and --recompute (Scan 3 recomputes decays and drives instead of Scan 1 emitting them).

    python core_lowering_trials.py export OUT.onnx [--one-transpose] [--recompute]
    python core_lowering_trials.py time FILE.onnx      (onnxruntime, 2 threads, batch 8 at 224, median of 5)
"""
import numpy as np
from onnx import TensorProto, helper


def _v(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _i64(name, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _f32(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _prep_nodes(p, dtr, u, b, A):
    """Nodes computing, per step, decay (B,S,D,N), drive and log-decay a from raw dt, u, B slice."""
    return [
        helper.make_node("Min", [dtr, "c20"], [p + "m"]),
        helper.make_node("Exp", [p + "m"], [p + "e"]),
        helper.make_node("Add", [p + "e", "c1"], [p + "e1"]),
        helper.make_node("Log", [p + "e1"], [p + "l"]),
        helper.make_node("Max", [dtr, p + "l"], [p + "dt"]),
        helper.make_node("Unsqueeze", [p + "dt", "axm1"], [p + "dt4"]),
        helper.make_node("Mul", [p + "dt4", A], [p + "a"]),
        helper.make_node("Exp", [p + "a"], [p + "decay"]),
        helper.make_node("Mul", [p + "dt", u], [p + "du"]),
        helper.make_node("Unsqueeze", [p + "du", "axm1"], [p + "du4"]),
        helper.make_node("Unsqueeze", [b, "axm2"], [p + "b4"]),
        helper.make_node("Mul", [p + "du4", p + "b4"], [p + "drive"]),
    ]


def _consts():
    return [_f32("c20", 20.0), _f32("c1", 1.0), _i64("axm1", [-1]), _i64("axm2", [-2])]


def body_ends(recompute):
    """Scan 1 body for two directions (f, r): states h_f, s_f, A_f, h_r, s_r, A_r; scan inputs
    dtr_f, u_f, b_f, dtr_r, u_r, b_r. Emits decay/drive per direction unless recompute."""
    nodes = _consts()
    ins, outs, emits = [], [], []
    for d in ("f", "r"):
        ins += [_v(f"h_{d}"), _v(f"s_{d}"), _v(f"A_{d}")]
    for d in ("f", "r"):
        ins += [_v(f"dtr_{d}"), _v(f"u_{d}"), _v(f"b_{d}")]
    for d in ("f", "r"):
        p = d + "_"
        nodes += _prep_nodes(p, f"dtr_{d}", f"u_{d}", f"b_{d}", f"A_{d}")
        nodes += [helper.make_node("Mul", [p + "decay", f"h_{d}"], [p + "kept"]),
                  helper.make_node("Add", [p + "kept", p + "drive"], [f"h_{d}_next"]),
                  helper.make_node("Add", [f"s_{d}", p + "a"], [f"s_{d}_next"]),
                  helper.make_node("Identity", [f"A_{d}"], [f"A_{d}_next"])]
        outs += [_v(f"h_{d}_next"), _v(f"s_{d}_next"), _v(f"A_{d}_next")]
        if not recompute:
            nodes += [helper.make_node("Identity", [p + "decay"], [p + "decay_out"]),
                      helper.make_node("Identity", [p + "drive"], [p + "drive_out"])]
            emits += [_v(p + "decay_out"), _v(p + "drive_out")]
    return helper.make_graph(nodes, "ends", ins, outs + emits)


def body_carry():
    """Scan 2: states c_f, c_r; inputs tot_f, end_f, tot_r, end_r; emits the state before each segment."""
    nodes, ins, outs, emits = [], [_v("c_f"), _v("c_r")], [], []
    for d in ("f", "r"):
        ins += [_v(f"t_{d}"), _v(f"e_{d}")]
    for d in ("f", "r"):
        nodes += [helper.make_node("Mul", [f"t_{d}", f"c_{d}"], [f"k_{d}"]),
                  helper.make_node("Add", [f"k_{d}", f"e_{d}"], [f"c_{d}_next"]),
                  helper.make_node("Identity", [f"c_{d}"], [f"c_{d}_out"])]
        outs.append(_v(f"c_{d}_next"))
        emits.append(_v(f"c_{d}_out"))
    return helper.make_graph(nodes, "carry", ins, outs + emits)


def body_out(recompute):
    """Scan 3: states h_f, h_r, (A_f, A_r if recompute), Dsum; scan inputs per direction
    (decay, drive, c) or (dtr, u, b, c), plus u for the skip term on f. Emits y_f, y_r (B,S,D)."""
    nodes = _consts()
    ins = [_v("h_f"), _v("h_r")] + ([_v("A_f"), _v("A_r")] if recompute else []) + [_v("Dsum")]
    outs = [_v("h_f_next"), _v("h_r_next")] + ([_v("A_f_next"), _v("A_r_next")] if recompute else []) + [_v("Dsum_next")]
    for d in ("f", "r"):
        ins += ([_v(f"dtr_{d}"), _v(f"u_{d}"), _v(f"b_{d}")] if recompute else [_v(f"decay_{d}"), _v(f"drive_{d}")])
        ins.append(_v(f"c_{d}"))
    if not recompute:
        ins.append(_v("u_f"))
    emits = []
    for d in ("f", "r"):
        p = d + "_"
        if recompute:
            nodes += _prep_nodes(p, f"dtr_{d}", f"u_{d}", f"b_{d}", f"A_{d}")
            nodes.append(helper.make_node("Identity", [f"A_{d}"], [f"A_{d}_next"]))
            decay, drive = p + "decay", p + "drive"
        else:
            decay, drive = f"decay_{d}", f"drive_{d}"
        nodes += [helper.make_node("Mul", [decay, f"h_{d}"], [p + "kept"]),
                  helper.make_node("Add", [p + "kept", drive], [f"h_{d}_next"]),
                  helper.make_node("Unsqueeze", [f"c_{d}", "axm2"], [p + "c4"]),
                  helper.make_node("Mul", [f"h_{d}_next", p + "c4"], [p + "hc"]),
                  helper.make_node("ReduceSum", [p + "hc", "axm1"], [p + "y0"], keepdims=0)]
        if d == "f":
            nodes += [helper.make_node("Mul", ["Dsum", "u_f"], ["skip"]),
                      helper.make_node("Add", [p + "y0", "skip"], [p + "y"])]
        else:
            nodes.append(helper.make_node("Identity", [p + "y0"], [p + "y"]))
        emits.append(_v(p + "y"))
    nodes.append(helper.make_node("Identity", ["Dsum"], ["Dsum_next"]))
    return helper.make_graph(nodes, "out", ins, outs + emits)


def scan_op(opset, n_in, n_out):
    from onnx.defs import OpSchema
    from onnxscript.values import Op
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    schema = OpSchema(
        "Scan", "", 16, inputs=[P(f"i{i}", "T") for i in range(n_in)],
        outputs=[P(f"o{i}", "T") for i in range(n_out)], type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[A("body", OpSchema.AttrType.GRAPH), A("num_scan_inputs", OpSchema.AttrType.INT),
                    A("scan_input_axes", OpSchema.AttrType.INTS, required=False),
                    A("scan_input_directions", OpSchema.AttrType.INTS, required=False),
                    A("scan_output_axes", OpSchema.AttrType.INTS, required=False),
                    A("scan_output_directions", OpSchema.AttrType.INTS, required=False)])
    return Op(opset, "Scan", schema)


RECOMPUTE = False
ONE_TRANSPOSE = False
import itertools
_COUNTER = itertools.count()   # unique body value names per Scan


def lower_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend="auto", save_states=False):
    from onnxscript import opset18 as op
    from onnxscript import ir

    def i64(*values):
        return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))

    def scalar(v):
        return op.Constant(value=ir.tensor(np.array(v, dtype=np.int64)))

    def body(g):
        import itertools
        tag = f"s{next(_COUNTER)}_"
        names = set(i.name for i in g.input) | set(o for nd in g.node for o in nd.output)
        for v in list(g.input) + list(g.output):
            v.name = tag + v.name
        for nd in g.node:
            nd.input[:] = [tag + i if i in names else i for i in nd.input]
            nd.output[:] = [tag + o for o in nd.output]
        return ir.serde.deserialize_graph(g)

    rank = op.Shape(dt_projs_weight, start=2, end=3)
    n = op.Shape(A_logs, start=1, end=2)
    A4 = op.Reshape(op.Neg(op.Exp(A_logs)), op.Concat(i64(4, -1), n, axis=0))          # (K, D, N)
    dsum = op.ReduceSum(op.Reshape(Ds, i64(4, -1)), i64(0), keepdims=0)                # (D,)
    wdt_aug = op.Concat(dt_projs_weight, op.Unsqueeze(dt_projs_bias, i64(-1)), axis=2)  # (K, D, R+1)
    ends = [op.Constant(value=ir.tensor(np.array([0], np.int64)))]
    o1 = rank; o2 = op.Add(rank, n); o3 = op.Add(o2, n)
    bounds = [i64(0), o1, o2, o3]
    width = o3                                                                          # R + 2N
    outs = {}
    if ONE_TRANSPOSE:
        u_cols, u_rows = op.Transpose(x, perm=[2, 3, 0, 1]), op.Transpose(x, perm=[3, 2, 0, 1])
    hw = op.Shape(x, start=2, end=4)
    bd = op.Shape(x, start=0, end=2)
    flat = op.Reshape(x, op.Concat(op.ReduceProd(bd, keepdims=1), op.ReduceProd(hw, keepdims=1), axis=0))
    if not ONE_TRANSPOSE:
        u_cols = op.Reshape(op.Transpose(flat, perm=[1, 0]), op.Concat(hw, bd, axis=0))      # (H, W, B, D)
    if not ONE_TRANSPOSE:
      u_rows = op.Reshape(op.Transpose(op.Reshape(u_cols, op.Concat(op.Shape(u_cols, start=0, end=2), i64(-1), axis=0)),
                                     perm=[1, 0, 2]),
                        op.Concat(op.Shape(u_cols, start=1, end=2), op.Shape(u_cols, start=0, end=1),
                                  op.Shape(u_cols, start=2, end=4), axis=0))              # (W, H, B, D)
    for group, (kf, kr), u, back in (("rows", (0, 2), u_rows, [2, 1, 0, 3]),
                                     ("cols", (1, 3), u_cols, [2, 0, 1, 3])):
        wg = op.Reshape(op.Gather(x_proj_weight, i64(kf, kr), axis=0), op.Concat(i64(-1), op.Shape(x_proj_weight, start=2, end=3), axis=0))
        proj = op.MatMul(u, op.Transpose(wg, perm=[1, 0]))                              # (S, B, M, 2(R+2N))
        lead = op.Shape(u, start=0, end=3)
        ones = op.ConstantOfShape(op.Concat(lead, i64(1), axis=0), value=ir.tensor(np.array([1.0], np.float32)))
        per = {}
        for j, k in enumerate((kf, kr)):
            base = i64(0) if j == 0 else width
            dts = op.Slice(proj, op.Add(base, bounds[0]), op.Add(base, bounds[1]), i64(-1))
            bb = op.Slice(proj, op.Add(base, bounds[1]), op.Add(base, bounds[2]), i64(-1))
            cc = op.Slice(proj, op.Add(base, bounds[2]), op.Add(base, bounds[3]), i64(-1))
            w = op.Transpose(op.Gather(wdt_aug, scalar(k), axis=0), perm=[1, 0])             # (R+1, D)
            dtr = op.MatMul(op.Concat(dts, ones, axis=3), w)                               # (S, B, M, D)
            a_k = op.Gather(A4, scalar(k), axis=0)                                            # (D, N)
            per[j] = (dtr, bb, cc, a_k)
        state_shape = op.Concat(op.Shape(u, start=1, end=4), n, axis=0)                   # (B, M, D, N)
        zeros = op.ConstantOfShape(state_shape)
        (dtr_f, b_f, c_f, a_f), (dtr_r, b_r, c_r, a_r) = per[0], per[1]
        n_emit = 0 if RECOMPUTE else 4
        r1 = scan_op(op, 12, 6 + n_emit)(zeros, zeros, a_f, zeros, zeros, a_r, dtr_f, u, b_f, dtr_r, u, b_r,
                                         body=body(body_ends(RECOMPUTE)), num_scan_inputs=6,
                                         scan_input_directions=[0, 0, 0, 1, 1, 1],
                                         **({} if RECOMPUTE else {"scan_output_directions": [0, 0, 1, 1]}))
        end_f, s_f, _, end_r, s_r, _ = r1[:6]
        zeros2 = op.ConstantOfShape(op.Concat(op.Shape(u, start=2, end=4), n, axis=0))
        r2 = scan_op(op, 6, 4)(zeros2, zeros2, op.Exp(s_f), end_f, op.Exp(s_r), end_r, body=body(body_carry()),
                               num_scan_inputs=4, scan_input_directions=[0, 0, 1, 1], scan_output_directions=[0, 1])
        start_f, start_r = r2[2], r2[3]
        dsum_g = dsum if group == "rows" else op.Mul(dsum, op.Constant(value=ir.tensor(np.array(0.0, np.float32))))
        if RECOMPUTE:
            r3 = scan_op(op, 5 + 8, 5 + 2)(start_f, start_r, a_f, a_r, dsum_g, dtr_f, u, b_f, c_f, dtr_r, u, b_r, c_r,
                                            body=body(body_out(True)), num_scan_inputs=8,
                                            scan_input_directions=[0, 0, 0, 0, 1, 1, 1, 1], scan_output_directions=[0, 1])
            y_f, y_r = r3[5], r3[6]
        else:
            dec_f, drv_f, dec_r, drv_r = r1[6:10]
            r3 = scan_op(op, 3 + 7, 3 + 2)(start_f, start_r, dsum_g, dec_f, drv_f, c_f, dec_r, drv_r, c_r, u,
                                           body=body(body_out(False)), num_scan_inputs=7,
                                           scan_input_directions=[0, 0, 0, 1, 1, 1, 0], scan_output_directions=[0, 1])
            y_f, y_r = r3[3], r3[4]
        outs[group] = op.Transpose(op.Add(y_f, y_r), perm=back)                        # (B, H, W, D)
    y = op.Transpose(op.Add(outs["rows"], outs["cols"]), perm=[0, 3, 1, 2])
    empty = op.Constant(value=ir.tensor(np.zeros((0,), np.float32)))
    return y, empty, op.Identity(empty)


def main():
    import statistics
    import sys
    import time

    global RECOMPUTE, ONE_TRANSPOSE
    if sys.argv[1] == "time":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(sys.argv[2], options, providers=["CPUExecutionProvider"])
        x = np.random.randn(8, 3, 224, 224).astype(np.float32)
        for _ in range(2):
            session.run(None, {"x": x})
        times = []
        for _ in range(5):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        print(f"{sys.argv[2]}: median {statistics.median(times):.3f} s")
        return
    import onnx
    import torch
    from vmamba_cli.export import export_program
    from vmamba_cli.model import create_model

    RECOMPUTE, ONE_TRANSPOSE = "--recompute" in sys.argv, "--one-transpose" in sys.argv
    torch.manual_seed(0)
    model = create_model("vmamba-tiny").eval()
    program = export_program(model, resolution=224)
    table = {torch.ops.vmamba.cross_selective_scan.default: lower_core}
    proto = torch.onnx.export(program, dynamo=True, opset_version=18, custom_translation_table=table,
                              input_names=["x"], output_names=["logits"], verbose=False, optimize=True).model_proto
    onnx.save_model(proto, sys.argv[2])
    import onnxruntime as ort
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    print(f"{sys.argv[2]}: max |onnxruntime - torch| {np.abs(got - ref).max():.2e}")


if __name__ == "__main__":
    main()
