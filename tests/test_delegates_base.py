"""The delegate registry (edgert/delegates/base.py): a delegate added out of tree is one module plus one
``register`` call, after which profiles may name it and sessions run its partitions."""
import numpy as np
import pytest

import edgert
from edgert import delegates, profiles
from edgert.delegates import base

import onnx_models as M
from profile_toml import npu_profile_toml

PROFILE = npu_profile_toml("mynpu-board", "a board whose accelerator is driven by a delegate registered outside edgert",
                           "DELEGATE", "{ clock_mhz = 800 }", active_w=10.0, per_hour_usd=0.5, cpu_memory="8.0e9",
                           ops='"MatMul", "Add", "Relu"')


class _Partition(delegates.CompiledPartition):
    """Runs the exported partition with onnxruntime, writing into the session's buffers."""

    def __init__(self, session, inputs, outputs, runs):
        self.session, self.inputs, self.outputs, self.runs = session, inputs, outputs, runs

    def run(self, inputs, outputs):
        for name, y in zip(self.outputs, self.session.run(self.outputs, {n: inputs[n] for n in self.inputs})):
            np.copyto(outputs[name], y)
        self.runs.append(tuple(self.inputs))


class MyNpu(delegates.Delegate):
    compiled: list = []
    runs: list = []

    def compile(self, partition, graph, unit=None, options=None):
        import onnxruntime as ort

        model = graph.subgraph_model(partition.nodes)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        MyNpu.compiled.append((partition.nodes, dict(unit.delegate_options)))
        return _Partition(sess, partition.inputs, partition.outputs, MyNpu.runs)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test: what it registers is gone afterwards."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    MyNpu.compiled, MyNpu.runs = [], []


def test_a_registered_delegate_runs_its_partitions(tmp_path, registry):
    path = tmp_path / "mynpu.toml"
    path.write_text(PROFILE.replace("DELEGATE", "mynpu"))
    with pytest.raises(edgert.ProfileError, match="'mynpu' is not one of host, onnxruntime"):
        profiles.load(path)  # not registered yet: an unknown name
    delegates.register("mynpu", MyNpu)
    prof = profiles.load(path)
    assert prof.unit("npu").delegate == "mynpu"
    assert profiles.runtime_status(prof.unit("npu")) == (True, "")  # the delegate's own available()
    model = M.mlp(batch=4, d_in=8, d_hidden=16, d_out=4)
    s = edgert.Session(model, device=str(path), fallback="forbid")
    assert [p.delegate for p in s.plan.partitions] == ["mynpu"]
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(s.run(None, {"x": x})[0], M.ort_run(model, {"x": x})[0])
    assert len(MyNpu.compiled) == 1 and MyNpu.compiled[0][1] == {"clock_mhz": 800}  # its options are its own
    assert len(MyNpu.runs) == 2


def test_unknown_delegates_are_still_refused_naming_the_registered_ones(tmp_path, registry):
    delegates.register("mynpu", MyNpu)
    path = tmp_path / "nosuch.toml"
    path.write_text(PROFILE.replace("DELEGATE", "nosuch"))
    with pytest.raises(edgert.ProfileError, match="units\\[1\\].delegate") as e:
        profiles.load(path)
    assert "'nosuch' is not one of" in str(e.value) and "mynpu" in str(e.value)
