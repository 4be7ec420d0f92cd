"""Device profiles the tests write: a host CPU and one accelerator unit behind a link (docs/profiles.md)."""


def npu_profile_toml(name: str, description: str, delegate: str, delegate_options: str, *, active_w: float = 5.0,
                     per_hour_usd: float = 0.36, cpu_float32: str = "1.0e9", cpu_memory: str = "1.0e9",
                     ops: str = '"MatMul", "Add"', link_kind: str = "pcie", zero_copy: bool = False) -> str:
    """The TOML text of a profile: unit "cpu" (host delegate, every op) and unit "npu" (``delegate`` with
    ``delegate_options``, float32, ``ops``) over a ``link_kind`` link. Numbers are written as TOML text, as given."""
    return f"""
name = "{name}"
description = "{description}"
[power]
active_w = {active_w}
idle_w = 1.0
[price]
per_hour_usd = {per_hour_usd}
[[units]]
name = "cpu"
kind = "cpu"
delegate = "host"
dtypes = ["*"]
ops = ["*"]
throughput = {{ float32 = {cpu_float32} }}
memory_bytes = {cpu_memory}
[[units]]
name = "npu"
kind = "npu"
delegate = "{delegate}"
delegate_options = {delegate_options}
dtypes = ["float32"]
ops = [{ops}]
throughput = {{ float32 = 1.0e13 }}
memory_bytes = 0
[units.link]
kind = "{link_kind}"
zero_copy = {str(zero_copy).lower()}
bandwidth_bytes_s = 1.0e10
latency_s = 1.0e-6
"""
