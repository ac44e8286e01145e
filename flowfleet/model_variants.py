"""Really worse model files, made from a good one: the demo's bad release, and the
drift and rollout tests' (`flowfleet demo` rolls one out and watches the registry's
drift judge take it back).

`broken_input_scaling` writes a copy of an int8 TFLite model whose input tensor
declares a quantisation scale ``gain`` times too small: the mistake of an export
that got the input normalisation wrong. The device quantises each pixel with the
declared parameters, so the network sees every pixel above ``1/gain`` of its range
clipped flat. It still loads, warms up and passes the agent's health gate and
probation (same size, same speed), so only the registry's drift judge can tell it
is worse: with ``gain`` 128 it found no object in 60 frames sampled across the
person clip (the good model: 145).

It needs the TFLite schema of ``ai-edge-litert`` (the ``tflite`` extra) and
``flatbuffers``; both are imported only when a variant is made.
"""

from __future__ import annotations

from pathlib import Path


def broken_input_scaling(src: Path, dst: Path, gain: float = 128.0) -> Path:
    """Write ``src`` to ``dst`` with its input scale divided by ``gain`` (see module).

    A leading PAD takes the input's quantisation too (the runtime requires its input
    and output to match); everything after it is left alone.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    data = src.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1:
        raise ValueError(f"{src}: expected one input tensor, found {len(graph.inputs)}")
    tensors = [graph.inputs[0]]
    first = graph.operators[0]
    code = model.operatorCodes[first.opcodeIndex]
    pad = max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.PAD
    if pad and first.inputs[0] == graph.inputs[0]:
        tensors.append(first.outputs[0])
    for index in tensors:
        q = graph.tensors[index].quantization
        if q is None or q.scale is None or not len(q.scale):
            raise ValueError(f"{src}: the input is not quantised (an int8 model is needed)")
        q.scale = [float(s) / gain for s in q.scale]
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    dst.write_bytes(bytes(builder.Output()))
    return dst
