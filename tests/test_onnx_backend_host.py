"""The ONNX backend node tests shipped inside the onnx package, for every op the host delegate claims (MatMul,
MatMulInteger, DynamicQuantizeLinear, DequantizeLinear), run through ``edgert.Session(model, "host")``: outputs must
equal the expected ones within the backend suite's own tolerance. Cases are read from the package's
``onnx/backend/test/data/node/*/model.onnx`` + ``test_data_set_0/*.pb`` when the wheel ships them, else generated
by the package's case generators (``onnx.backend.test.case.node.collect_testcases``), which write those files."""
import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgert
from edgert import telemetry
from edgert.delegates.host import CLAIMED_OPS

PATTERN = re.compile(r"^test_(matmul_|matmulinteger|dynamicquantizelinear|dequantizelinear)")
RTOL, ATOL = 1e-3, 1e-7  # onnx.backend.test's defaults


def _from_files():
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not PATTERN.match(d.name) or not (d / "model.onnx").exists():
            continue
        ds = d / "test_data_set_0"

        def load(prefix):
            arrs = []
            for f in sorted(ds.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1])):
                t = onnx.TensorProto()
                t.ParseFromString(f.read_bytes())
                arrs.append(numpy_helper.to_array(t))
            return arrs

        out.append((d.name, onnx.load(str(d / "model.onnx")), load("input"), load("output")))
    return out


def _generated():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [(c.name, c.model, list(c.data_sets[0][0]), list(c.data_sets[0][1])) for c in cases
            if PATTERN.match(c.name) and c.model is not None and c.data_sets]


def _numpy_values(case) -> bool:
    arrays = [np.asarray(a) if isinstance(a, np.generic) else a for a in [*case[2], *case[3]]]
    return all(isinstance(a, np.ndarray) and a.dtype.kind != "V" and a.dtype.name in np.sctypeDict for a in arrays)


# float8 / int4 / int2 / float4 DequantizeLinear cases are left out: their values have no numpy dtype (edgert's
# pools hold numpy arrays) and the host delegate claims DequantizeLinear only for int8 / uint8 / int32 weights
CASES = [c for c in (_from_files() or _generated()) if _numpy_values(c)]


def test_cases_cover_every_claimed_op():
    ops = {n.op_type for _, m, _, _ in CASES for n in m.graph.node}
    for op in CLAIMED_OPS:
        if ":" not in op:  # MatMulNBits (com.microsoft) has no ONNX backend case: tests/test_delegates_host.py
            assert op in ops or op == "MatMul" and "MatMul" in ops


@pytest.mark.parametrize("name,model,inputs,outputs", CASES, ids=[c[0] for c in CASES])
def test_node_case_on_host(tmp_path, name, model, inputs, outputs):
    import onnxruntime as ort

    telemetry.set_enabled(False)
    inputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in inputs]
    outputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in outputs]
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = dict(zip(names, inputs))
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        # cases are written at the newest opset; onnxruntime may implement the op only up to an older one
        from onnx import version_converter

        onnx.save(version_converter.convert_version(model, 21), path)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s = edgert.Session(str(path), "host")
    got = s.run(None, feeds)
    assert len(got) == len(outputs)
    for g, want in zip(got, outputs):
        assert g.dtype == want.dtype and g.shape == want.shape
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(g.astype(np.float64), want.astype(np.float64), rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_array_equal(g, want)
    telemetry.set_enabled(None)
