"""Fixtures shared by the kernel tests: run a test once per CPU variant this machine can run, and put the
process-wide choices (ISA, pool size) back afterwards so tests do not leak state into each other."""
import pytest

import edgert

AVAILABLE_ISAS = edgert.native.info()["isas"]
SIMD_ISAS = [name for name in AVAILABLE_ISAS if name != "ref"]


@pytest.fixture(autouse=True)
def _restore_native_state():
    before = edgert.native.info()
    yield
    edgert.native.set_isa(before["isa"])
    edgert.native.set_threads(before["threads"])


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Each kernel variant this CPU can run, selected for the duration of the test."""
    return edgert.native.set_isa(request.param)


@pytest.fixture(params=SIMD_ISAS)
def simd_isa(request):
    """Each SIMD variant this CPU can run (none on a CPU with only the reference: those tests are skipped)."""
    return request.param
