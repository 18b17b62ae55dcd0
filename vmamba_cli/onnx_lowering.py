"""The SS2D core operator ``vmamba::cross_selective_scan`` in standard ONNX operators.

``cross_selective_scan_onnx`` is the translation that ``vmamba_cli.export`` hands to
``torch.onnx.export`` for that operator (docs/design.md §5.4). It needs onnx and onnxscript (the
``export`` extra), imported when it runs.
"""

from __future__ import annotations

import numpy as np

from vmamba_cli.errors import ExportError

# The four scan routes of docs/design.md §3.7 come in two pairs that visit the map along the same
# lines: rows (route 0 forward, route 2 backward) and columns (route 1 forward, route 3 backward).
# Each pair works in a "step-major" copy of x: (S, M, B, D) with S the steps of one line (W for
# rows, H for columns), M the lines, channels last. A line is a segment of the route's sequence,
# so the recurrence runs as three ONNX Scans over that copy (docs/design.md §5.4):
#   1. every line from a zero state, in parallel (one Scan iteration = one step of every line),
#      which also forms the step sizes, decays and drives per step and emits them;
#   2. the line-end states carried across the lines, giving each line its true starting state;
#   3. every line again from its starting state, emitting y = C h (+ D u) per step.
# The backward route of a pair is the same Scan reading its inputs from the other end
# (scan_input_directions) and writing its outputs back in place: no flipped copies exist. All the
# elementwise work happens inside the Scan bodies on one (M, B, D) slice at a time, which stays in
# cache; onnxruntime's passes over whole (B, 4D, L) tensors were the cost of the former lowering
# (README, "Tried and dropped").

def _value(name: str):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _body_constants(softplus: bool, with_states: bool):
    from onnx import TensorProto, helper

    def constant(name, dtype, values, dims):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    nodes = []
    if softplus:
        nodes += [constant("twenty", TensorProto.FLOAT, [20.0], []), constant("one", TensorProto.FLOAT, [1.0], [])]
    if with_states:
        nodes += [constant("last", TensorProto.INT64, [-1], [1]), constant("second_last", TensorProto.INT64, [-2], [1])]
    return nodes


def _decay_and_drive_nodes(p: str, with_states: bool):
    """Body nodes: from the raw step size ``{p}dt_raw`` (dt_proj output plus bias), ``{p}u`` and
    ``{p}b`` (one step), the step's decay exp(dt A) ``{p}decay``, drive dt B u ``{p}drive`` and
    log-decay ``{p}a``. softplus as PyTorch defines it (the input itself above 20), in five cheap
    passes: log(1 + exp(min(z, 20))) >= z below 20 and rounds to 20 at it, so the Max picks z above
    (onnxruntime's own Softplus is a slower scalar loop). ``with_states``: d_state > 1, the state
    has a last axis N (A is (D, N), B (M, B, N)); otherwise A is (D,) and B (M, B, 1)."""
    from onnx import helper

    n = helper.make_node
    nodes = [n("Min", [p + "dt_raw", "twenty"], [p + "low"]), n("Exp", [p + "low"], [p + "e"]),
             n("Add", [p + "e", "one"], [p + "e1"]), n("Log", [p + "e1"], [p + "sp"]),
             n("Max", [p + "dt_raw", p + "sp"], [p + "dt"]), n("Mul", [p + "dt", p + "u"], [p + "dtu"])]
    if with_states:
        nodes += [n("Unsqueeze", [p + "dt", "last"], [p + "dt_n"]), n("Unsqueeze", [p + "dtu", "last"], [p + "dtu_n"]),
                  n("Unsqueeze", [p + "b", "second_last"], [p + "b_n"])]
        dt, dtu, b = p + "dt_n", p + "dtu_n", p + "b_n"
    else:
        dt, dtu, b = p + "dt", p + "dtu", p + "b"
    nodes += [n("Mul", [dt, p + "A"], [p + "a"]), n("Exp", [p + "a"], [p + "decay"]),
              n("Mul", [dtu, b], [p + "drive"])]
    return nodes


def _graph(nodes, name, inputs, outputs):
    from onnx import helper
    from onnxscript import ir

    return ir.serde.deserialize_graph(helper.make_graph(nodes, name, [_value(v) for v in inputs],
                                                        [_value(v) for v in outputs]))


def _line_ends_body(with_states: bool):
    """Scan 1 of a route pair (f forward, r backward). States per route: h (from zero), s (sum of
    the log-decays: the line's total decay is exp(s)), A (passed through). Scan inputs per route:
    dt_raw, u, b. Emits per route: decay, drive."""
    from onnx import helper

    nodes, states, state_outs, scan_ins, emits = _body_constants(True, with_states), [], [], [], []
    for p in ("f_", "r_"):
        nodes += _decay_and_drive_nodes(p, with_states)
        nodes += [helper.make_node("Mul", [p + "decay", p + "h"], [p + "kept"]),
                  helper.make_node("Add", [p + "kept", p + "drive"], [p + "h_next"]),
                  helper.make_node("Add", [p + "s", p + "a"], [p + "s_next"]),
                  helper.make_node("Identity", [p + "A"], [p + "A_next"])]
        states += [p + "h", p + "s", p + "A"]
        state_outs += [p + "h_next", p + "s_next", p + "A_next"]
        scan_ins += [p + "dt_raw", p + "u", p + "b"]
        emits += [p + "decay", p + "drive"]
    return _graph(nodes, "line_ends", states + scan_ins, state_outs + emits)


def _carry_body():
    """Scan 2: states c (per route), scan inputs the line's total decay and end state; emits the
    state each line starts from, then carries it past the line."""
    from onnx import helper

    nodes = []
    for p in ("f_", "r_"):
        nodes += [helper.make_node("Mul", [p + "total", p + "c"], [p + "kept"]),
                  helper.make_node("Add", [p + "kept", p + "end"], [p + "c_next"]),
                  helper.make_node("Identity", [p + "c"], [p + "start"])]
    return _graph(nodes, "line_carry", ["f_c", "r_c", "f_total", "f_end", "r_total", "r_end"],
                  ["f_c_next", "r_c_next", "f_start", "r_start"])


def _line_outputs_body(with_states: bool, skip: bool):
    """Scan 3: states h per route (the line's starting state) and, with ``skip``, the summed D of
    all four routes (added once, on the forward route of the rows pair); scan inputs per route:
    decay, drive, c (and u with ``skip``). Emits y = C h per route."""
    from onnx import helper

    n = helper.make_node
    nodes = _body_constants(False, with_states)
    states, state_outs, scan_ins, emits = ["f_h", "r_h"], ["f_h_next", "r_h_next"], [], []
    for p in ("f_", "r_"):
        nodes += [n("Mul", [p + "decay", p + "h"], [p + "kept"]), n("Add", [p + "kept", p + "drive"], [p + "h_next"])]
        if with_states:
            nodes += [n("Unsqueeze", [p + "c", "second_last"], [p + "c_n"]),
                      n("Mul", [p + "h_next", p + "c_n"], [p + "hc"]),
                      n("ReduceSum", [p + "hc", "last"], [p + "y"], keepdims=0)]
        else:
            nodes.append(n("Mul", [p + "h_next", p + "c"], [p + "y"]))
        scan_ins += [p + "decay", p + "drive", p + "c"]
    emits = ["f_y", "r_y"]
    if skip:
        nodes += [n("Mul", ["D", "f_u"], ["skip"]), n("Add", ["f_y", "skip"], ["f_y_skip"]),
                  n("Identity", ["D"], ["D_next"])]
        states, state_outs, scan_ins, emits = states + ["D"], state_outs + ["D_next"], scan_ins + ["f_u"], ["f_y_skip", "r_y"]
    return _graph(nodes, "line_outputs", states + scan_ins, state_outs + emits)


def _scan_op(opset, inputs: int, outputs: int):
    """ONNX Scan as an onnxscript op with ``inputs`` inputs and ``outputs`` outputs.

    Scan's inputs and outputs are variadic lists; the exporter's recorder gives a variadic list
    one value, so the op is described by a schema naming each input and output.
    """
    from onnx.defs import OpSchema
    from onnxscript.values import Op

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    ints = OpSchema.AttrType.INTS
    schema = OpSchema(
        "Scan", "", 16, inputs=[P(f"input_{i}", "T") for i in range(inputs)],
        outputs=[P(f"output_{i}", "T") for i in range(outputs)], type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[A("body", OpSchema.AttrType.GRAPH), A("num_scan_inputs", OpSchema.AttrType.INT)]
        + [A(name, ints, required=False) for name in ("scan_input_axes", "scan_input_directions",
                                                      "scan_output_axes", "scan_output_directions")])
    return Op(opset, "Scan", schema)


def _static_dims(value, name: str) -> tuple[int, ...]:
    dims = tuple(value.shape) if value.shape is not None else ()
    if not dims or not all(isinstance(d, int) for d in dims):
        raise ExportError(f"the ONNX lowering needs the static shape of {name}, got {dims or 'none'}")
    return dims


def cross_selective_scan_onnx(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                               backend: str = "auto", save_states: bool = False):
    """vmamba::cross_selective_scan (docs/design.md §3.5) in standard ONNX operators (opset >= 18).

    x (B, D, H, W) -> y (B, D, H, W); the two residual outputs are empty (an exported program is
    for inference). B, H and W are read with Shape at run time, so the graph is the same for every
    batch and image size; D, d_state N and the dt rank R are the parameters' static sizes.
    """
    from onnxscript import ir
    from onnxscript import opset18 as op

    routes, proj_width, _ = _static_dims(x_proj_weight, "x_proj_weight")
    _, d_inner, rank = _static_dims(dt_projs_weight, "dt_projs_weight")
    d_state = _static_dims(A_logs, "A_logs")[1]
    if routes != 4 or proj_width != rank + 2 * d_state:
        raise ExportError(f"unexpected SS2D parameter shapes: x_proj_weight {routes}x{proj_width}, rank {rank}, "
                          f"d_state {d_state}")
    with_states = d_state > 1

    def ints(*values):
        return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))

    def index(value):
        return op.Constant(value=ir.tensor(np.array(value, dtype=np.int64)))

    A = op.Neg(op.Exp(A_logs))                                                    # (4D, N)
    A = op.Reshape(A, ints(4, d_inner, d_state) if with_states else ints(4, d_inner))
    D_total = op.ReduceSum(op.Reshape(Ds, ints(4, d_inner)), ints(0), keepdims=0)    # (D,)
    # dt_proj with its bias as one more input column (the projection gets a constant-1 column).
    dt_weight = op.Concat(dt_projs_weight, op.Unsqueeze(dt_projs_bias, ints(-1)), axis=2)  # (4, D, R+1)

    # Step-major copies of x, each made by a transpose that moves whole rows or channel blocks
    # (onnxruntime's general N-d transpose does the same in ~20x the time): columns first as the 2-d
    # transpose of (B*D, H*W), rows from columns by swapping the two leading axes of (H, W, B*D).
    # (H, W, B*D) is a separate Reshape so that the two transposes are not merged into one.
    batch_channels, sizes = op.Shape(x, start=0, end=2), op.Shape(x, start=2, end=4)
    flat = op.Reshape(x, op.Concat(op.ReduceProd(batch_channels, keepdims=1), ints(-1), axis=0))
    u_cols = op.Reshape(op.Transpose(flat, perm=[1, 0]), op.Concat(sizes, batch_channels, axis=0))  # (H, W, B, D)
    height, width = op.Shape(u_cols, start=0, end=1), op.Shape(u_cols, start=1, end=2)
    lines = op.Transpose(op.Reshape(u_cols, op.Concat(height, width, ints(-1), axis=0)), perm=[1, 0, 2])
    u_rows = op.Reshape(lines, op.Concat(width, height, op.Shape(u_cols, start=2, end=4), axis=0))  # (W, H, B, D)

    y = None
    # (routes, step-major copy, perm of its (S, M, B, D) to (B, H, W, D))
    for (forward, backward), u, to_bhwd in (((0, 2), u_rows, [2, 1, 0, 3]), ((1, 3), u_cols, [2, 0, 1, 3])):
        pair = op.Reshape(op.Gather(x_proj_weight, ints(forward, backward), axis=0), ints(2 * proj_width, d_inner))
        proj = op.MatMul(u, op.Transpose(pair, perm=[1, 0]))                      # (S, M, B, 2(R+2N))
        ones = op.ConstantOfShape(op.Concat(op.Shape(u, start=0, end=3), ints(1), axis=0),
                                  value=ir.tensor(np.array([1.0], dtype=np.float32)))
        per_route = []
        for j, route in enumerate((forward, backward)):
            base = j * proj_width

            def part(start, stop):
                return op.Slice(proj, ints(base + start), ints(base + stop), ints(-1))

            dt_raw = op.MatMul(op.Concat(part(0, rank), ones, axis=3),
                               op.Transpose(op.Gather(dt_weight, index(route), axis=0), perm=[1, 0]))  # (S, M, B, D)
            per_route.append((dt_raw, part(rank, rank + d_state), part(rank + d_state, proj_width),
                              op.Gather(A, index(route), axis=0)))
        (dt_f, b_f, c_f, A_f), (dt_r, b_r, c_r, A_r) = per_route
        state_shape = op.Shape(u, start=1, end=4)                                 # (M, B, D)
        if with_states:
            state_shape = op.Concat(state_shape, ints(d_state), axis=0)
        zeros = op.ConstantOfShape(state_shape)
        ends = _scan_op(op, 12, 10)(
            zeros, zeros, A_f, zeros, zeros, A_r, dt_f, u, b_f, dt_r, u, b_r,
            body=_line_ends_body(with_states), num_scan_inputs=6,
            scan_input_directions=[0, 0, 0, 1, 1, 1], scan_output_directions=[0, 0, 1, 1])
        end_f, log_total_f, _, end_r, log_total_r, _, decay_f, drive_f, decay_r, drive_r = ends
        carry_zeros = op.ConstantOfShape(op.Shape(zeros, start=1))                # (B, D[, N])
        carried = _scan_op(op, 6, 4)(
            carry_zeros, carry_zeros, op.Exp(log_total_f), end_f, op.Exp(log_total_r), end_r,
            body=_carry_body(), num_scan_inputs=4, scan_input_directions=[0, 0, 1, 1], scan_output_directions=[0, 1])
        start_f, start_r = carried[2], carried[3]
        skip = y is None
        outputs = _scan_op(op, 8 + 2 * skip, 4 + skip)(
            start_f, start_r, *([D_total] if skip else []), decay_f, drive_f, c_f, decay_r, drive_r, c_r,
            *([u] if skip else []),
            body=_line_outputs_body(with_states, skip), num_scan_inputs=6 + skip,
            scan_input_directions=[0, 0, 0, 1, 1, 1] + [0] * skip, scan_output_directions=[0, 1])
        y_f, y_r = outputs[2 + skip], outputs[3 + skip]
        pair_y = op.Transpose(op.Add(y_f, y_r), perm=to_bhwd)                     # (B, H, W, D)
        y = pair_y if y is None else op.Add(y, pair_y)
    empty = op.Constant(value=ir.tensor(np.zeros((0,), dtype=np.float32)))
    return op.Transpose(y, perm=[0, 3, 1, 2]), empty, op.Identity(empty)


__all__ = ["cross_selective_scan_onnx"]
