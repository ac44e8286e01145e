"""Recognise model files by their bytes and read their metadata from the file itself.

`inspect_model` is the single entry point: it names the runtime from the content
(never from the file name), checks the file is complete and parseable, and returns
the metadata the registry stores and signs. Anything it cannot vouch for raises
`FormatError` with a one-line reason, so a corrupt or wrong upload changes nothing.

* ``tflite``: a FlatBuffer with the file identifier ``TFL3`` at bytes 4..8; parsed
  with LiteRT (``ai_edge_litert``) or ``tflite_runtime`` when installed (inputs,
  outputs, dtypes, quantization), else only its FlatBuffer root offset is checked.
* ``onnx``: a protobuf ``ModelProto``; parsed with ``onnx`` when installed (graph
  inputs/outputs, opset, quantization operators, labels from the ``names`` metadata
  entry that Ultralytics exports write), else the whole protobuf wire structure is
  walked to prove it is complete.
* ``eim``: an Edge Impulse model, which is a Linux ELF executable; the header gives
  the target architecture. It is never executed by the registry.
"""

from __future__ import annotations

import ast
import struct
from collections import Counter
from pathlib import Path
from typing import Any

RUNTIMES = ("tflite", "onnx", "eim")


class FormatError(ValueError):
    """The bytes are not a model the registry accepts; the message says why."""


def sniff(head: bytes) -> str | None:
    """The runtime a file's first bytes (at least 16) indicate, or None.

    Same rules as the agent's ``sniff_runtime``, plus a stricter ONNX test: the
    first field must be ``ir_version`` (field 1, varint) with a plausible value.
    """
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if head[:4] == b"\x7fELF":
        return "eim"
    if len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80:
        return "onnx"
    return None


def inspect_model(path: str | Path, labels: list[str] | None = None) -> dict[str, Any]:
    """Runtime and metadata of the model file at ``path``; raises FormatError.

    ``labels``, when given (an accompanying labels file), overrides labels found in
    the model.
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise FormatError("the file is empty")
    with p.open("rb") as fh:
        head = fh.read(64)
    if len(head) < 16:
        raise FormatError(f"the file is too short to be a model ({size} bytes)")
    runtime = sniff(head)
    if runtime is None:
        raise FormatError(
            "not a model file: expected a TFLite FlatBuffer ('TFL3' at bytes 4..8), an "
            f"ONNX protobuf or an Edge Impulse .eim ELF executable; first bytes {head[:8]!r}"
        )
    if runtime == "tflite":
        meta = _inspect_tflite(p.read_bytes())
    elif runtime == "onnx":
        meta = _inspect_onnx(p.read_bytes())
    else:
        meta = _inspect_elf(head, size)
    if labels is not None:
        meta["labels"] = list(labels)
        meta["labels_source"] = "labels file"
    return {"runtime": runtime, **meta}


def read_labels(path: str | Path) -> list[str]:
    """Labels from a text file: one per line, or ``index name`` / ``index: name`` lines."""
    out = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        if first.rstrip(":").isdigit() and rest.strip():
            line = rest.strip()
        out.append(line)
    if not out:
        raise FormatError(f"{path}: the labels file has no labels")
    return out


# -- TFLite ----------------------------------------------------------------------------


def _tflite_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    return Interpreter


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    entry: dict[str, Any] = {
        "name": str(detail["name"]),
        "shape": [int(x) for x in detail.get("shape_signature", detail["shape"])],
        "dtype": getattr(detail["dtype"], "__name__", str(detail["dtype"])),
    }
    if scale:
        entry["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return entry


def _inspect_tflite(data: bytes) -> dict[str, Any]:
    (root,) = struct.unpack_from("<I", data, 0)
    if root + 4 > len(data):
        raise FormatError(f"truncated or corrupt TFLite file (root offset {root} past the end)")
    Interpreter = _tflite_interpreter()
    if Interpreter is None:
        return {"parser": "none (install ai-edge-litert to read TFLite metadata)"}
    try:
        interp = Interpreter(model_content=data)
        inputs = [_tensor(d) for d in interp.get_input_details()]
        outputs = [_tensor(d) for d in interp.get_output_details()]
        dtypes = Counter(
            getattr(d["dtype"], "__name__", str(d["dtype"])) for d in interp.get_tensor_details()
        )
    except (ValueError, RuntimeError) as exc:
        raise FormatError(f"truncated or corrupt TFLite file: {exc}") from None
    if inputs and all(i["dtype"] in ("int8", "uint8") for i in inputs):
        quant = f"full integer ({inputs[0]['dtype']})"
    elif dtypes.get("int8") or dtypes.get("uint8"):
        quant = "dynamic range int8 (float input/output)"
    elif dtypes.get("float16"):
        quant = "float16 weights"
    else:
        quant = "none (float32)"
    return {
        "parser": "litert",
        "inputs": inputs,
        "outputs": outputs,
        "quantization": quant,
        "output_layout": _output_layout(outputs),
    }


def _output_layout(outputs: list[dict[str, Any]]) -> str:
    names = " ".join(o["name"] for o in outputs)
    if "TFLite_Detection_PostProcess" in names:
        return "ssd-postprocess"
    if len(outputs) == 1 and len(outputs[0]["shape"]) == 3:
        _, a, b = outputs[0]["shape"]
        if a > 4 and b > a:  # [1, 4 + classes, anchors]
            return f"yolov8 ({a - 4} classes)"
    return "unknown"


# -- ONNX ------------------------------------------------------------------------------

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}
_QUANT_OPS = {
    "DynamicQuantizeLinear": "dynamic int8",
    "QLinearConv": "static int8 (QOperator)",
    "QLinearMatMul": "static int8 (QOperator)",
    "QuantizeLinear": "static int8 (QDQ)",
    "ConvInteger": "dynamic int8",
    "MatMulInteger": "dynamic int8",
}


def _inspect_onnx(data: bytes) -> dict[str, Any]:
    try:
        import onnx
    except ImportError:
        _walk_protobuf(data)
        return {"parser": "protobuf wire check (install onnx to read ONNX metadata)"}
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise FormatError(f"truncated or corrupt ONNX file: {exc}") from None
    graph = model.graph
    if not graph.node:
        raise FormatError("ONNX file has an empty graph (truncated or not a model)")
    initializers = {i.name for i in graph.initializer}

    def tensors(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            dims = [
                int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or -1)
                for d in tt.shape.dim
            ]
            out.append(
                {
                    "name": v.name,
                    "shape": dims,
                    "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)),
                }
            )
        return out

    props = {p.key: p.value for p in model.metadata_props}
    ops = Counter(n.op_type for n in graph.node)
    quant = next((q for op, q in _QUANT_OPS.items() if ops.get(op)), "none")
    outputs = tensors(graph.output)
    meta: dict[str, Any] = {
        "parser": "onnx",
        "inputs": tensors(graph.input),
        "outputs": outputs,
        "quantization": quant,
        "output_layout": _output_layout(outputs),
        "ir_version": int(model.ir_version),
        "opset": {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    labels = _onnx_labels(props.get("names"))
    if labels:
        meta["labels"] = labels
        meta["labels_source"] = "onnx metadata 'names'"
    for key in ("description", "task", "imgsz", "version", "author"):
        if key in props:
            meta.setdefault("model_info", {})[key] = props[key][:256]
    return meta


def _onnx_labels(text: str | None) -> list[str] | None:
    """Labels from an Ultralytics ``names`` entry: a dict literal ``{0: 'person', ...}``."""
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, dict) and all(isinstance(k, int) for k in value):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, list):
        return [str(v) for v in value]
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise FormatError("truncated ONNX file (varint runs past the end)")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FormatError("corrupt ONNX file (varint too long)")


def _walk_protobuf(data: bytes) -> None:
    """Check the top level of a protobuf message ends exactly at the end of the data
    and that it holds a graph (ModelProto field 7)."""
    pos, fields = 0, set()
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise FormatError("corrupt ONNX file (field number 0)")
        fields.add(field)
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise FormatError(f"corrupt ONNX file (wire type {wire})")
        if pos > len(data):
            raise FormatError("truncated ONNX file (a field runs past the end)")
    if 7 not in fields:
        raise FormatError("ONNX file has no graph (truncated or not a model)")


# -- Edge Impulse .eim (ELF) -------------------------------------------------------------

_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}


def _inspect_elf(head: bytes, size: int) -> dict[str, Any]:
    if len(head) < 20:
        raise FormatError("truncated ELF header")
    cls, order = head[4], head[5]
    if cls not in (1, 2) or order not in (1, 2):
        raise FormatError("corrupt ELF header (bad class or byte order)")
    fmt = "<" if order == 1 else ">"
    e_type, machine = struct.unpack_from(fmt + "HH", head, 16)
    if e_type not in (2, 3):  # executable or position-independent executable
        raise FormatError(f"ELF file is not an executable (e_type {e_type})")
    if cls == 2 and len(head) >= 64:
        (shoff,) = struct.unpack_from(fmt + "Q", head, 40)
        shentsize, shnum = struct.unpack_from(fmt + "HH", head, 58)
        if shoff and shoff + shentsize * shnum > size:
            raise FormatError("truncated ELF executable (section table past the end)")
    return {
        "parser": "elf header",
        "target_arch": _ELF_MACHINES.get(machine, f"machine {machine}"),
        "elf_class": "64-bit" if cls == 2 else "32-bit",
    }
