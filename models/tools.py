"""Model tools behind ``flowfleet models inspect`` and ``flowfleet models bench``.

``inspect_model`` reads what a file says about itself (runtime, tensors,
quantisation, labels, checksum) without needing a decoder for its outputs, so it also
describes models the agent cannot run. ``bench_model`` measures the raw invoke rate
(model only, no pre/post-processing) after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flowfleet.agent.detectors import ModelError, is_eim_script, load_detector, sniff_runtime
from flowfleet.models.catalog import sha256_file


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def detect_runtime(path: str | Path) -> str:
    """``tflite``, ``onnx`` or ``eim`` for a model file.

    Raises:
        ModelError: missing, empty, unreadable or not a model file (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found" if not p.exists() else f"{p}: not a file")
    try:
        with p.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ModelError(f"{p}: cannot read model file: {e.strerror or e}") from e
    if not head:
        raise ModelError(f"{p}: model file is empty")
    runtime = sniff_runtime(head) if len(head) >= 8 else None
    if runtime is None and is_eim_script(p, head):
        runtime = "eim"
    if runtime is None:
        raise ModelError(f"{p}: not a TFLite, ONNX or Edge Impulse .eim model file")
    return runtime


def _tflite_tensors(path: Path) -> tuple[list[dict], list[dict]]:
    from flowfleet.agent.detectors.tflite import import_interpreter

    try:
        interpreter_cls, _ = import_interpreter()
    except ImportError as e:
        raise ModelError(f"{path}: {e}") from None
    from flowfleet.agent.detectors.native_stderr import captured_stderr

    try:
        with captured_stderr():  # LiteRT's delegate chatter (shown with -v)
            interp = interpreter_cls(model_path=str(path))
            interp.allocate_tensors()
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelError(f"{path}: cannot load TFLite model: {_one_line(e)}") from e

    def tensor(d: dict) -> dict:
        scale, zp = d["quantization"]
        qp = d.get("quantization_parameters") or {}
        scales = list(qp.get("scales", []))
        row = {
            "name": d["name"],
            "shape": [int(x) for x in d["shape"]],
            "dtype": d["dtype"].__name__,
            "quantization": {"scale": float(scale), "zero_point": int(zp)} if scale else None,
        }
        if row["quantization"] and len(scales) > 1:
            row["quantization"]["per_channel"] = len(scales)
        return row

    return (
        [tensor(d) for d in interp.get_input_details()],
        [tensor(d) for d in interp.get_output_details()],
    )


def _onnx_details(path: Path) -> tuple[list[dict], list[dict], dict, dict]:
    from flowfleet.agent.detectors.onnx import import_onnxruntime

    try:
        ort = import_onnxruntime()
    except ImportError as e:
        raise ModelError(f"{path}: {e}") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{path}: cannot load ONNX model: {_one_line(e)}") from e

    def tensor(t) -> dict:
        return {"name": t.name, "shape": list(t.shape), "dtype": t.type, "quantization": None}

    meta = dict(sess.get_modelmeta().custom_metadata_map)
    quant: dict = {"scheme": "none"}
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        ops = Counter(n.op_type for n in model.graph.node)
        q_ops = {
            k: v
            for k, v in ops.items()
            if k
            in (
                "QuantizeLinear",
                "DequantizeLinear",
                "DynamicQuantizeLinear",
                "ConvInteger",
                "MatMulInteger",
                "QLinearConv",
                "QLinearMatMul",
            )
        }
        if ops.get("DynamicQuantizeLinear") or ops.get("ConvInteger"):
            quant = {"scheme": "dynamic int8 (activations quantised at run time)"}
        elif ops.get("QuantizeLinear") and ops.get("DequantizeLinear"):
            quant = {"scheme": "static int8 QDQ"}
        elif ops.get("QLinearConv"):
            quant = {"scheme": "static int8 QOperator"}
        init_types = Counter(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer
        )
        quant["quant_ops"] = q_ops
        quant["initializer_dtypes"] = dict(init_types)
        quant["opset"] = max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None
        )
    except ImportError:
        quant = {"scheme": "unknown (install the onnx package to read the graph)"}
    except Exception:
        pass
    return (
        [tensor(t) for t in sess.get_inputs()],
        [tensor(t) for t in sess.get_outputs()],
        meta,
        quant,
    )


def inspect_model(path: str | Path, *, labels: str | Path | None = None) -> dict:
    """Describe a model file: runtime, tensors, quantisation, labels, sha256, decoder.

    Raises:
        ModelError: the file is not a loadable model (one line naming it).
    """
    p = Path(path)
    runtime = detect_runtime(p)
    info: dict = {
        "file": str(p),
        "size_bytes": p.stat().st_size,
        "sha256": sha256_file(p),
        "runtime": runtime,
    }
    if runtime == "tflite":
        info["inputs"], info["outputs"] = _tflite_tensors(p)
    elif runtime == "onnx":
        info["inputs"], info["outputs"], meta, quant = _onnx_details(p)
        info["quantization"] = quant
        info["metadata"] = {k: v for k, v in meta.items() if k != "names"}
    # The decoder check and labels come from the agent's own loader: what inspect
    # reports is exactly what a device would use.
    try:
        det = load_detector(p, labels=labels, warmup=0)
    except ModelError as e:
        info["decoder"] = None
        info["agent_can_run"] = False
        info["reason"] = str(e)
        info["labels"] = None
        return info
    try:
        info["agent_can_run"] = True
        info["decoder"] = getattr(det, "decoder", "yolov8")
        info["labels"] = list(getattr(det, "model_labels", None) or det.labels)
        info["label_source"] = getattr(det, "label_source", None)
        if info["decoder"] == "ssd":
            opts = getattr(det, "postprocess_options", {}) or {}
            info["postprocess"] = {k: v for k, v in opts.items() if not k.startswith("_")}
            info["state_feedback"] = [list(p) for p in getattr(det, "state_names", ())]
        lmap = getattr(det, "label_map", None)
        if lmap is not None:  # the agent renames these labels (MappedDetector)
            info["label_map"] = {
                a: lmap.labels[i] for a, i in zip(lmap.source_labels, lmap.lut, strict=True)
            }
            info["flow_labels"] = list(lmap.labels)
        if runtime == "eim":
            hello = getattr(det, "hello", {}) or {}
            params = dict(hello.get("model_parameters", {}))
            params.pop("labels", None)
            info["inputs"] = [
                {
                    "name": "image",
                    "shape": list(det.info.input_shape),
                    "dtype": det.info.input_dtype,
                    "quantization": None,
                }
            ]
            info["outputs"] = []
            info["model_parameters"] = params
            info["project"] = hello.get("project")
    finally:
        det.close()
    return info


def format_inspect(info: dict) -> str:
    """Human-readable text for ``inspect_model``'s result."""
    lines = [
        f"file:     {info['file']}",
        f"runtime:  {info['runtime']}",
        f"size:     {info['size_bytes']:,} bytes",
        f"sha256:   {info['sha256']}",
    ]

    def tensor_line(kind: str, t: dict) -> str:
        q = t.get("quantization")
        qs = f"  scale {q['scale']:.6g} zero_point {q['zero_point']}" if q else ""
        return f"{kind:<9} {t['name']}: {t['shape']} {t['dtype']}{qs}"

    for t in info.get("inputs", []):
        lines.append(tensor_line("input:", t))
    for t in info.get("outputs", []):
        lines.append(tensor_line("output:", t))
    if "quantization" in info:
        q = info["quantization"]
        lines.append(f"quantization: {q.get('scheme')}")
        if q.get("quant_ops"):
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(q["quant_ops"].items()))
            lines.append(f"  ops: {ops}")
    if info.get("model_parameters"):
        mp = info["model_parameters"]
        lines.append(
            f"edge impulse: {mp.get('model_type')} {mp.get('image_input_width')}x"
            f"{mp.get('image_input_height')}x{mp.get('image_channel_count')}"
        )
    if info.get("postprocess"):
        pp = info["postprocess"]
        lines.append(
            f"postprocess: TFLite_Detection_PostProcess, {pp.get('num_classes')} classes, "
            f"max {pp.get('max_detections')} detections"
        )
    for a, b in info.get("state_feedback", []):
        lines.append(f"state:    {b} -> {a} (fed back each frame)")
    if info.get("agent_can_run"):
        labels = info["labels"] or []
        shown = ", ".join(labels[:12]) + (
            f", ... ({len(labels)} in all)" if len(labels) > 12 else ""
        )
        lines.append(f"decoder:  {info['decoder']}")
        lines.append(f"labels:   {shown}  [{info.get('label_source')}]")
        if info.get("label_map"):
            pairs = ", ".join(f"{a} -> {b}" for a, b in info["label_map"].items() if a != b)
            lines.append(f"label map: {pairs}")
    else:
        lines.append(f"decoder:  none: {info.get('reason')}")
    return "\n".join(lines)


def bench_model(
    path: str | Path,
    *,
    threads: int = 2,
    seconds: float = 5.0,
    warmup: int = 3,
    min_runs: int = 3,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Raw invoke rate of a model: ``warmup`` runs, then invoke for ``seconds``.

    ``progress`` (optional) is called after each timed run with the elapsed seconds.

    Returns:
        dict with runtime, threads, runs, seconds, invokes_per_s and ms mean / median /
        p90 / min.

    Raises:
        ModelError: the model cannot be loaded by the agent (one line naming it).
    """
    p = Path(path)
    runtime = detect_runtime(p)
    det = load_detector(p, threads=threads, warmup=0)
    try:
        for _ in range(max(0, warmup)):
            det.invoke_raw()
        times: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            det.invoke_raw()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if progress is not None:
                progress(t1 - start)
            if t1 - start >= seconds and len(times) >= min_runs:
                break
        total = time.perf_counter() - start
        providers = list(getattr(det, "providers", ()) or ())
    finally:
        det.close()
    ms = sorted(t * 1000 for t in times)
    return {
        "file": str(p),
        "runtime": runtime,
        "providers": providers or None,
        "threads": threads,
        "warmup": warmup,
        "runs": len(ms),
        "seconds": round(total, 3),
        "invokes_per_s": round(len(ms) / total, 2),
        "ms_mean": round(statistics.fmean(ms), 2),
        "ms_median": round(statistics.median(ms), 2),
        "ms_p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 2),
        "ms_min": round(ms[0], 2),
    }
