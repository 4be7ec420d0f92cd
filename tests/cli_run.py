"""Run edgert in a fresh interpreter the way a user does: the installed package, not the source checkout.

`python -m` and `python -c` put the working directory first on sys.path; run from the checkout's root, that
would import the uncompiled source tree (no `_ffi`) instead of what `pip install .` installed. Every subprocess
therefore starts in an empty directory of its own, so paths handed to it must be absolute."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

NEUTRAL_CWD = tempfile.mkdtemp(prefix="edgert-tests-cwd-")
atexit.register(shutil.rmtree, NEUTRAL_CWD, True)


def python_argv(*args) -> list[str]:
    return [sys.executable, *args]


def cli_argv(*args) -> list[str]:
    return python_argv("-m", "edgert.cli", *args)


def run_python(*args, env=None, input=None, timeout=120) -> subprocess.CompletedProcess:
    """`python ARGS...` with `env` as the whole environment (default: this process's)."""
    return subprocess.run(python_argv(*args), input=input, capture_output=True, text=True, timeout=timeout,
                          env=os.environ if env is None else env, cwd=NEUTRAL_CWD)


def edgert_cmd(*args, input=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`edgert ARGS...` with `env` added to this process's environment."""
    return run_python("-m", "edgert.cli", *args, input=input, timeout=timeout, env={**os.environ, **(env or {})})


def edgert_popen(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(cli_argv(*args), env={**os.environ, **(env or {})}, cwd=NEUTRAL_CWD, **kw)
