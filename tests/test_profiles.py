"""Device profiles: every shipped profile loads, the host is detected, broken profiles name the field and the
reason, and ComputeUnit.supports explains its refusals."""
import copy
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgert
from edgert import profiles as P
from edgert.errors import ProfileError
from edgert.formats.onnx import load_onnx

import onnx_models as M
from cli_run import edgert_cmd

SHIPPED = sorted(["host", "rpi5", "rk3588", "imx8mp", "coral-usb", "snapdragon-x", "ryzen-ai", "core-ultra-npu",
                  "serial-npu"])


def test_list_profiles():
    assert P.list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name):
    prof = P.load(name)
    assert prof.name == name and prof.units and prof.power_w > 0 and prof.price_usd_per_hour >= 0
    assert prof.host_unit.delegate == "host" and prof.host_unit.ops.get("*") is not None
    for u in prof.units:
        assert u.throughput and all(v > 0 for v in u.throughput.values())
        assert (u.link is None) == (u.delegate == "host")
        ok, why = P.runtime_status(u)
        assert isinstance(ok, bool) and why


@pytest.mark.parametrize("name", SHIPPED)
def test_every_figure_is_cited(name):
    """Each figure carries a comment (on its line or the line above) saying where it comes from, or that it is an
    estimate."""
    lines = (Path(P.profiles_dir()) / f"{name}.toml").read_text().splitlines()
    for k, line in enumerate(lines):
        code = line.split("#")[0]
        if any(key in code for key in ("active_w", "idle_w", "unit_usd", "throughput", "bandwidth_bytes_s",
                                       "latency_s", "per_hour_usd")):
            cited = "#" in line or (k and lines[k - 1].lstrip().startswith("#"))
            assert cited, f"{name}.toml: figure without a source: {line.strip()}"


def test_top_level_directory_is_the_packaged_one():
    root = Path(__file__).resolve().parents[1]
    assert (root / "device_profiles").resolve() == (root / "edgert" / "device_profiles").resolve()


def test_detect_host():
    prof = P.detect_host()
    info = edgert.native.info()
    cpu = prof.host_unit
    assert cpu.cores == info["physical_cores"] and cpu.isa == tuple(info["isas"])
    assert cpu.memory_bytes > 1e8 and cpu.throughput["float32"] > 1e9
    assert prof.host["isa"] == info["isa"]


def test_attach_host_puts_the_host_cpu_first():
    prof = P.load("coral-usb")
    assert [u.name for u in prof.units] == ["cpu", "tpu"] and prof.units[0].cores == edgert.native.info()["physical_cores"]


def test_price_and_link_math():
    prof = P.load("rpi5")
    assert prof.price_usd_per_hour == pytest.approx(80.0 / 26280)
    assert prof.cost_usd(3600) == pytest.approx(prof.price_usd_per_hour)
    link = P.load("coral-usb").unit("tpu").link
    assert link.transfer_s(0) == link.latency_s
    assert link.transfer_s(320_000_000) == pytest.approx(link.latency_s + 1.0)
    assert P.Link("shared-memory", True, 1e9, 1e-6).transfer_s(10**9) == 1e-6  # zero-copy: latency only
    with pytest.raises(ProfileError):
        P.load("rpi5").unit("npu")


# ---- broken profiles --------------------------------------------------------------------------------------
GOOD = {
    "name": "toy", "description": "a toy board",
    "power": {"active_w": 5.0, "idle_w": 1.0},
    "price": {"unit_usd": 100.0, "amortize_hours": 1000},
    "units": [
        {"name": "cpu", "kind": "cpu", "delegate": "host", "dtypes": ["*"], "ops": ["*"],
         "throughput": {"float32": 1e10}, "memory_bytes": 1e9},
        {"name": "npu", "kind": "npu", "delegate": "onnxruntime",
         "delegate_options": {"providers": ["FooExecutionProvider"]}, "dtypes": ["int8", "uint8"],
         "ops": ["Conv", "MatMul"], "op": [{"name": "Relu", "max_rank": 4}],
         "throughput": {"int8": 1e12}, "memory_bytes": 0,
         "link": {"kind": "pcie", "zero_copy": False, "bandwidth_bytes_s": 2e9, "latency_s": 2e-5}},
    ],
}


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if k.isdigit() else d[k]
    last = keys[-1]
    if value is _DELETE:
        del d[int(last) if last.isdigit() else last]
    else:
        d[int(last) if last.isdigit() else last] = value


_DELETE = object()

BROKEN = [
    ("description", _DELETE, "description", "missing required field"),
    ("power.active_w", _DELETE, "power.active_w", "missing required field"),
    ("power.idle_w", 9.0, "power.idle_w", "exceeds active"),
    ("units.1.link.bandwidth_bytes_s", -2e9, "units[1].link.bandwidth_bytes_s", "must be > 0"),
    ("units.1.link.latency_s", -1.0, "units[1].link.latency_s", "must be >= 0"),
    ("units.1.link.kind", "wifi", "units[1].link.kind", "not one of"),
    ("units.1.link", _DELETE, "units[1].link", "needs its host link"),
    ("units.0.frequency", 3, "units[0].frequency", "unknown key"),
    ("colour", "red", "colour", "unknown key"),
    ("units.1.delegate", "cuda", "units[1].delegate", "not one of"),
    ("units.1.delegate_options", {}, "units[1].delegate_options.providers", "missing required field"),
    ("units.1.delegate_options.providers", [], "units[1].delegate_options.providers", "non-empty list"),
    ("units.1.dtypes", ["int8", "float33"], "units[1].dtypes[1]", "unknown dtype 'float33'"),
    ("units.1.throughput", {"float32": 1e12}, "units[1].throughput.float32", "not in this unit's dtypes"),
    ("units.1.throughput.int8", "fast", "units[1].throughput.int8", "expected a number"),
    ("units.1.ops", ["Conv2D"], "units[1].ops[0]", "not an operator of ONNX"),
    ("units.1.ops", ["Conv", "com.microsoft:NotAnOp"], "units[1].ops[1]", "not an operator of 'com.microsoft'"),
    ("units.1.ops", ["ai.onnx.ml:Nope"], "units[1].ops[0]", "not an operator of 'ai.onnx.ml'"),
    ("units.1.op.0.max_rank", 4.5, "units[1].op[0].max_rank", "expected an integer"),
    ("units.1.name", "cpu", "units[1].name", "duplicate unit name"),
    ("units.0.memory_bytes", -1, "units[0].memory_bytes", "must be >= 0"),
    ("price", {"per_hour_usd": 1.0, "unit_usd": 5.0}, "price", "not both"),
    ("price", {}, "price", "missing per_hour_usd"),
    ("price.amortize_hours", 0, "price.amortize_hours", "must be > 0"),
    ("units", [], "units", "at least one"),
    ("units.0.isa", ["ref", "sse9"], "units[0].isa", "unknown kernel variant 'sse9'"),
    ("power", "lots", "power", "expected a table"),
]


@pytest.mark.parametrize("path,value,field,reason", BROKEN, ids=[b[2] + ":" + b[3] for b in BROKEN])
def test_broken_profile_names_field(path, value, field, reason):
    data = copy.deepcopy(GOOD)
    _set(data, path, value)
    with pytest.raises(ProfileError) as exc:
        P.parse_profile(data, "toy.toml")
    assert exc.value.field == field and reason in exc.value.reason
    assert str(exc.value).startswith(f"device profile toy.toml: {field}: ")
    assert isinstance(exc.value, edgert.InvalidArgumentError)


def test_op_names_of_known_and_custom_domains_are_taken():
    data = copy.deepcopy(GOOD)
    _set(data, "units.1.ops", ["Conv", "ai.onnx:Relu", "com.microsoft:QLinearAdd", "ai.onnx.ml:TreeEnsembleClassifier",
                               "com.vendor:FusedThing"])  # a domain neither onnx nor onnxruntime knows: as written
    assert set(P.parse_profile(data, "toy.toml").unit("npu").ops) >= {"Conv", "com.microsoft:QLinearAdd",
                                                                        "com.vendor:FusedThing"}


def test_good_toy_profile_parses():
    prof = P.parse_profile(copy.deepcopy(GOOD), "toy.toml")
    assert prof.price_usd_per_hour == pytest.approx(0.1)
    assert set(prof.unit("npu").ops) == {"Conv", "MatMul", "Relu"} and prof.unit("npu").ops["Relu"].max_rank == 4


def test_load_from_path_and_bad_toml(tmp_path):
    src = (Path(P.profiles_dir()) / "rk3588.toml").read_text()
    (tmp_path / "mine.toml").write_text(src.replace('name = "rk3588"', 'name = "mine"'))
    assert P.load(tmp_path / "mine.toml").name == "mine"
    (tmp_path / "bad.toml").write_text(src.replace("bandwidth_bytes_s = 1.0e10", "bandwidth_bytes_s = -1.0e10"))
    with pytest.raises(ProfileError, match=r"units\[1\]\.link\.bandwidth_bytes_s: must be > 0"):
        P.load(str(tmp_path / "bad.toml"))
    (tmp_path / "junk.toml").write_text("name = [unclosed")
    with pytest.raises(ProfileError, match="not valid TOML"):
        P.load(str(tmp_path / "junk.toml"))
    with pytest.raises(ProfileError, match="no device profile named 'nope'"):
        P.load("nope")
    (tmp_path / "adir").mkdir()
    with pytest.raises(ProfileError, match="a directory, not a .toml file"):
        P.load(tmp_path / "adir")


# ---- supports ---------------------------------------------------------------------------------------------
def test_supports_reasons(tmp_path):
    npu = P.parse_profile(copy.deepcopy(GOOD), "toy.toml").unit("npu")
    g = load_onnx(M.mlp())
    ok, why = npu.supports(g.node("mm1"), g)
    assert not ok and why.startswith("dtype float32 not supported (tensor x")
    ok, why = npu.supports(g.node("add1"), g)
    assert not ok and why == "op Add not in the npu op list"
    static = P.load("rk3588").unit("npu")
    qg = load_onnx(M.qdq_convnet(tmp_path))
    conv = qg.node("conv1")
    assert P.load("host").host_unit.supports(conv, qg) == (True, "")
    ok, why = static.supports(conv, qg)  # a QDQ Conv still computes in float32 between its DQ and Q
    assert not ok and "float32" in why
    q = next(n for n in qg.nodes if n.op_type == "DequantizeLinear" and qg.tensors[n.inputs[0]].initializer is None)
    ok, why = static.supports(q, qg)
    assert not ok and "dtype float32" in why  # DQ outputs float32; its scale input is not what refuses it


def test_supports_dynamic_shape_and_rank():
    unit = P.ComputeUnit("npu", "npu", "onnxruntime", {"providers": ["X"]}, ("float32",), {"*": P.OpConstraint("*")},
                         {"float32": 1e12}, 0, P.Link("pcie", False, 1e9, 1e-5), max_rank=1, static_shapes=True)
    g = load_onnx(M.mlp())
    ok, why = unit.supports(g.node("relu1"), g)
    assert not ok and why == "dynamic shape: tensor h2 has shape ('batch', 16)"
    ok, why = unit.supports(g.node("relu1"), g, bindings={"batch": 2})
    assert not ok and why == "rank 2 > max_rank 1 (tensor h2)"
    unit.max_rank, unit.max_dim = 4, 8
    ok, why = unit.supports(g.node("relu1"), g.bind({"batch": 2}))
    assert not ok and why == "dim 16 > max_dim 8 (tensor h2)"


def test_supports_control_flow_needs_its_bodies():
    g = load_onnx(M.if_model())
    unit = P.ComputeUnit("npu", "npu", "onnxruntime", {"providers": ["X"]}, ("float32", "bool"),
                         {k: P.OpConstraint(k) for k in ("If", "Mul")}, {"float32": 1e12}, 0,
                         P.Link("pcie", False, 1e9, 1e-5))
    ok, why = unit.supports(g.node("branch"), g)
    assert not ok and why == "If body else_branch: node else_sub: op Sub not in the npu op list"
    assert P.load("host").host_unit.supports(g.node("branch"), g) == (True, "")


def nested_if_model():
    """An If whose then-branch holds another If: both branches of the inner one read x from two scopes out."""
    from onnx import TensorProto as T
    from onnx import helper

    vi = helper.make_tensor_value_info
    inner = helper.make_node(
        "If", ["c"], ["i_out"], name="inner_if",
        then_branch=helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="inner_relu")], "it", [],
                                      [vi("r", T.FLOAT, [4])]),
        else_branch=helper.make_graph([helper.make_node("Neg", ["x"], ["n"], name="inner_neg")], "ie", [],
                                      [vi("n", T.FLOAT, [4])]))
    then_g = helper.make_graph([inner], "then", [], [vi("i_out", T.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="outer_neg")], "else", [],
                               [vi("e", T.FLOAT, [4])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="outer_if", then_branch=then_g,
                                            else_branch=else_g)], "nested",
                          [vi("x", T.FLOAT, [4]), vi("c", T.BOOL, [])], [vi("y", T.FLOAT, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("model, ops", [(M.if_model, ("If", "Mul", "Sub")), (nested_if_model, ("If", "Relu", "Neg"))])
def test_supports_bodies_reading_outer_scope_tensors(model, ops):
    """Body nodes reading a value of an enclosing graph (x, k) are judged by that value's dtype and shape, found
    through the enclosing graphs: before, "unknown dtype (tensor x ...)" put them on units with dtypes ["*"] only."""
    g = load_onnx(model())
    node = next(n for n in g.nodes if n.op_type == "If")

    def unit(dtypes, static=False):  # the If itself takes any dtype: what is judged here is its bodies
        return P.ComputeUnit("npu", "npu", "onnxruntime", {"providers": ["X"]}, dtypes,
                             {k: P.OpConstraint(k, dtypes=("*",) if k == "If" else None) for k in ops},
                             {"float32": 1e12}, 0, P.Link("pcie", False, 1e9, 1e-5), static_shapes=static,
                             max_rank=1)

    assert unit(("float32", "bool")).supports(node, g) == (True, "")
    assert unit(("float32", "bool"), static=True).supports(node, g) == (True, "")  # x is (4,): static, rank 1
    ok, why = unit(("float16", "bool")).supports(node, g)
    assert not ok and "dtype float32 not supported (tensor x" in why and "unknown" not in why


# ---- packaging and CLI --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wheel_ships_profiles(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path),
                        str(root)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("edgert-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for n in SHIPPED:
        assert f"edgert/device_profiles/{n}.toml" in names


def test_cli_devices_json():
    r = edgert_cmd("devices", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    m = out["machine"]
    assert m["physical_cores"] == edgert.native.info()["physical_cores"] and m["isa"] == edgert.native.info()["isa"]
    assert "CPUExecutionProvider" in m["onnxruntime_providers"]
    assert isinstance(m["serial_ports"], list)
    assert [p["name"] for p in out["profiles"]] == SHIPPED
    snap = next(p for p in out["profiles"] if p["name"] == "snapdragon-x")
    npu = next(u for u in snap["units"] if u["name"] == "npu")
    import onnxruntime

    assert npu["available"] == ("QNNExecutionProvider" in onnxruntime.get_available_providers())


def test_cli_devices_table():
    r = edgert_cmd("devices")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("this machine: ") and "onnxruntime: " in r.stdout and "serial ports:" in r.stdout
    for n in SHIPPED:
        assert f"\n{n}: " in r.stdout


def test_huge_integer_is_a_profile_error_not_overflow():
    import tomllib

    data = tomllib.loads((P.profiles_dir() / "rk3588.toml").read_text())
    data["power"]["active_w"] = 10**400  # an unbounded TOML integer: float() of it overflows
    with pytest.raises(ProfileError) as ei:
        P.parse_profile(data, "big.toml")
    assert ei.value.field == "power.active_w" and "too large" in ei.value.reason


def test_profile_file_not_utf8_is_a_profile_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ProfileError) as ei:
        P.load(f)
    assert ei.value.file == str(f) and "utf-8" in ei.value.reason


@pytest.mark.parametrize("unit, opts, field", [
    (0, {"threads": "x"}, "units[0].delegate_options.threads"),
    (0, {"threads": -3}, "units[0].delegate_options.threads"),
    (0, {"threads": 257}, "units[0].delegate_options.threads"),  # 5000 hung Session creation in onnxruntime
    (1, {"library": "librknnrt.so", "target": 3588}, "units[1].delegate_options.target"),
])
def test_typed_delegate_options_are_checked(unit, opts, field):
    import tomllib

    data = tomllib.loads((P.profiles_dir() / "rk3588.toml").read_text())
    data["units"][unit]["delegate_options"] = opts  # were accepted, and reached the delegate as they were
    with pytest.raises(ProfileError) as ei:
        P.parse_profile(data, "rk.toml")
    assert ei.value.field == field


def test_table_and_serial_options_are_checked():
    import tomllib

    for name, opts, field in (("snapdragon-x", {"providers": ["QNNExecutionProvider"], "session_options": "fast"},
                               "session_options"),
                              ("serial-npu", {"timeout_s": -1.0}, "timeout_s"), ("serial-npu", {"port": 7}, "port"),
                              ("serial-npu", {"retries": 2.5}, "retries"), ("serial-npu", {"url": 1}, "url"),
                              ("serial-npu", {"retry_after_s": "soon"}, "retry_after_s")):
        data = tomllib.loads((P.profiles_dir() / f"{name}.toml").read_text())
        unit = next(u for u in data["units"] if u["delegate"] != "host")
        unit["delegate_options"] = opts
        with pytest.raises(ProfileError) as ei:
            P.parse_profile(data, f"{name}.toml")
        assert ei.value.field.endswith(f"delegate_options.{field}"), (name, ei.value.field)


@pytest.mark.parametrize("so, why", [
    ({"bogus": 1}, "no setting 'bogus'"), ({"optimized_model_filepath": "/tmp/x.onnx"}, "write files"),
    ({"enable_profiling": True}, "write files"), ({"intra_op_num_threads": 100000}, "intra_op_num_threads must be"),
    ({"graph_optimization_level": "FAST"}, "graph_optimization_level 'FAST' is not one of"),
    ({"log_severity_level": "loud"}, "log_severity_level='loud' is not accepted"), ({"__class__": 1}, "no setting"),
])
def test_session_options_are_checked_when_the_profile_loads(so, why):
    """session_options reached onnxruntime unchecked when a partition compiled: an unknown key failed only then, and
    optimized_model_filepath made Session creation write a file wherever the profile said."""
    import tomllib

    data = tomllib.loads((P.profiles_dir() / "snapdragon-x.toml").read_text())
    unit = next(u for u in data["units"] if u["delegate"] != "host")
    unit["delegate_options"] = {"providers": ["QNNExecutionProvider"], "session_options": so}
    with pytest.raises(ProfileError, match="session_options") as ei:
        P.parse_profile(data, "sx.toml")
    assert why in ei.value.reason and ei.value.field.endswith("delegate_options.session_options")
    unit["delegate_options"]["session_options"] = {"intra_op_num_threads": 2, "graph_optimization_level":
                                                   "ORT_ENABLE_BASIC"}
    P.parse_profile(data, "sx.toml")


def test_a_profile_nested_too_deeply_is_a_profile_error(tmp_path):
    f = tmp_path / "deep.toml"
    f.write_text("v = " + "[" * 1200 + "]" * 1200 + "\n")  # RecursionError from the TOML parser, a traceback
    with pytest.raises(ProfileError, match="nested too deeply"):
        P.load(f)


def test_serial_npu_profiles_take_the_session_options_docs_list():
    """docs/profiles.md lists url, retries and retry_after_s for a serial-npu unit; the profile refused them."""
    import tomllib

    data = tomllib.loads((P.profiles_dir() / "serial-npu.toml").read_text())
    unit = next(u for u in data["units"] if u["delegate"] == "serial-npu")
    unit["delegate_options"] = {"url": "/dev/ttyUSB0", "baudrate": 115200, "timeout_s": 0.1, "retries": 0,
                                "retry_after_s": 0}
    got = next(u for u in P.parse_profile(data, "s.toml").units if u.delegate == "serial-npu")
    assert got.delegate_options["retries"] == 0 and got.delegate_options["url"] == "/dev/ttyUSB0"


def test_a_profile_without_a_host_unit_is_refused():
    import tomllib

    data = tomllib.loads((P.profiles_dir() / "rk3588.toml").read_text())
    data["units"] = [u for u in data["units"] if u["delegate"] != "host"]
    # was accepted: host_unit fell back to the NPU, and plan put every node on it, listed or not
    with pytest.raises(ProfileError) as ei:
        P.parse_profile(data, "rk.toml")
    assert ei.value.field == "units" and "'host' delegate" in ei.value.reason
    data["attach"] = "host"  # the detected CPU goes in front: fine
    assert P.parse_profile(data, "rk.toml").units[0].delegate == "rknn"
