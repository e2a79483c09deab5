"""Models from the Hugging Face hub: `REPO[:QUANT]` -> a .gguf file in huggingface_hub's own cache.

    Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m   -> the repo's *q4_k_m.gguf (case-insensitive)
    Qwen/Qwen2.5-0.5B-Instruct-GGUF          -> its Q4_K_M file, else the only .gguf (else: say which exist)

`resolve` (used by every command's MODEL argument) looks in the local cache first and only goes to the hub
when the file is missing, so a model once fetched works offline. `pull` always asks the hub (and fetches
a newer version if there is one). Downloads go through `hf_hub_download` (resumable, checked, atomic) with
a Rich progress bar. The hub is `HF_ENDPOINT` (default https://huggingface.co), as for huggingface_hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qcpu.errors import QcpuError

# owner/name[:quant]; names as the hub allows them (letters, digits, - _ .), quant like Q4_K_M or IQ4_XS.
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")
# The quant tag in a GGUF file name: "...-Q4_K_M.gguf", "...q8_0.gguf", "...IQ4_XS.gguf", "...f16.gguf".
_QUANT_AT_END = re.compile(r"(?i)(?:^|[-_.])((?:i?q\d+(?:_[a-z0-9]+)*)|bf16|fp16|f16|fp32|f32)$")
_QUANT_ANYWHERE = re.compile(r"(?i)(?<![a-z0-9])((?:i?q\d+(?:_[a-z0-9]+)*)|bf16|fp16|f16|fp32|f32)(?![a-z0-9])")
_SPLIT = re.compile(r"(?i)-\d{5}-of-\d{5}$")
PREFERRED = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q8_0", "Q6_K", "Q4_K_S")


def looks_like_repo(spec: str) -> bool:
    """`owner/name[:QUANT]` and not something that reads like a local path."""
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or spec.lower().endswith(".gguf"):
        return False
    return _SPEC.match(spec) is not None


def parse_spec(spec: str) -> tuple[str, str | None]:
    m = _SPEC.match(spec.strip())
    if not m:
        raise QcpuError(f"{spec}: not a model path or a hub name like Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m")
    quant = m.group("quant")
    return m.group("repo"), (normalize_quant(quant) if quant else None)


def normalize_quant(q: str) -> str:
    q = q.upper().replace("-", "_")
    return {"FP16": "F16", "FP32": "F32"}.get(q, q)


def quant_of(filename: str) -> str | None:
    """The quant tag of a GGUF file name ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf" -> "Q4_K_M"), if any."""
    stem = Path(filename).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    stem = _SPLIT.sub("", stem)
    m = _QUANT_AT_END.search(stem) or _QUANT_ANYWHERE.search(stem)
    return normalize_quant(m.group(1)) if m else None


def is_split(filename: str) -> bool:
    name = Path(filename).name
    return bool(_SPLIT.search(name[:-5] if name.lower().endswith(".gguf") else name))


def choose_file(repo: str, files: list[str], quant: str | None) -> str:
    """The .gguf in `files` for `quant` (None: the preferred default)."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if not ggufs:
        raise QcpuError(f"{repo} has no .gguf files; qcpu runs GGUF models (look for a repo named ...-GGUF)")
    by_quant: dict[str, list[str]] = {}
    for f in ggufs:
        by_quant.setdefault(quant_of(f) or "?", []).append(f)
    available = ", ".join(sorted(q for q in by_quant if q != "?")) or ", ".join(sorted(ggufs))
    if quant is None:
        pick = next((q for q in PREFERRED if q in by_quant), None)
        if pick is None:
            if len(ggufs) == 1:
                return ggufs[0]
            raise QcpuError(f"{repo} has several GGUF files; name one: {repo}:QUANT with QUANT one of {available}")
        quant = pick
    matches = by_quant.get(quant, [])
    if not matches:
        raise QcpuError(f"{repo} has no {quant} file; available: {available}")
    whole = [f for f in matches if not is_split(f)]
    if not whole:
        raise QcpuError(f"{repo}:{quant} is split into several files ({Path(matches[0]).name}, ...); "
                        "qcpu reads single-file GGUFs (merge them with llama-gguf-split --merge)")
    return sorted(whole, key=len)[0]


# -- the local cache --------------------------------------------------------------------------------------

@dataclass
class CachedModel:
    repo: str
    filename: str
    quant: str | None
    path: Path
    size: int

    @property
    def spec(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def _hub_cache(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every .gguf file in huggingface_hub's cache (newest revision of each file name)."""
    root = _hub_cache(cache_dir)
    if not root.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(root)
    except Exception:
        return []
    out: dict[tuple[str, str], tuple[float, CachedModel]] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            for f in rev.files:
                if not f.file_name.lower().endswith(".gguf") or not f.file_path.exists():
                    continue
                rel = str(f.file_path.relative_to(rev.snapshot_path))
                key = (repo.repo_id, rel)
                if key not in out or rev.last_modified > out[key][0]:
                    out[key] = (rev.last_modified, CachedModel(repo.repo_id, rel, quant_of(rel), f.file_path,
                                                               f.size_on_disk))
    return sorted((m for _, m in out.values()), key=lambda m: (m.repo.lower(), m.filename))


def find_cached(repo: str, quant: str | None, cache_dir: str | Path | None = None) -> Path | None:
    mine = [m for m in cached_models(cache_dir) if m.repo.lower() == repo.lower()]
    if not mine:
        return None
    try:
        name = choose_file(repo, [m.filename for m in mine], quant)
    except QcpuError:
        return None
    return next(m.path for m in mine if m.filename == name)


# -- the hub ----------------------------------------------------------------------------------------------

def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _offline_message(spec: str, endpoint: str, why: str = "") -> str:
    return (f"cannot reach the Hugging Face hub at {endpoint}{f' ({why})' if why else ''} to fetch {spec}, and "
            f"it is not in the local cache: connect to the internet and run `qcpu pull {spec}`, "
            "or pass a local .gguf file")


def _hub_errors(spec: str, repo: str, endpoint: str):
    """Turn huggingface_hub / network exceptions into one-line QcpuErrors."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        from huggingface_hub import errors

        try:
            yield
        except QcpuError:
            raise
        except errors.GatedRepoError:
            raise QcpuError(f"{repo} is gated: accept its terms on the hub, then `hf auth login`") from None
        except errors.RepositoryNotFoundError:
            raise QcpuError(f"{repo}: not a local file, nor a model repository on {endpoint} "
                            "(check the name; private repos need `hf auth login`)") from None
        except errors.RevisionNotFoundError:
            raise QcpuError(f"{repo}: revision not found on {endpoint}") from None
        except errors.OfflineModeIsEnabled:
            raise QcpuError(f"{spec} is not in the local cache and HF_HUB_OFFLINE is set: unset it and run "
                            f"`qcpu pull {spec}`, or pass a local .gguf file") from None
        except errors.LocalEntryNotFoundError:
            raise QcpuError(_offline_message(spec, endpoint)) from None
        except errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise QcpuError(f"the hub at {endpoint} answered HTTP {status} for {spec}") from None
        except OSError as e:  # disk full, permissions, a broken download
            raise QcpuError(f"fetching {spec} failed: {e}") from None
        except Exception as e:
            if _is_network_error(e):
                raise QcpuError(_offline_message(spec, endpoint, _why(e))) from None
            raise

    return guard()


def _why(e: BaseException) -> str:
    text = str(e).lower()
    if "refused" in text:
        return "connection refused"
    if "name" in text and ("resolution" in text or "not known" in text or "resolve" in text):
        return "no DNS"
    if "timed out" in text or "timeout" in type(e).__name__.lower():
        return "timed out"
    return type(e).__name__


def _is_network_error(e: BaseException) -> bool:
    """Connection refused, DNS failure, timeouts (httpx/httpx2/requests), without importing all of them."""
    for cls in type(e).__mro__:
        if cls.__name__ in ("TransportError", "ConnectError", "TimeoutException", "NetworkError",
                            "ConnectionError", "Timeout", "ProxyError"):
            return True
    return False


def list_repo_files(repo: str, endpoint: str | None = None, revision: str = "main") -> list[str]:
    """The repo's file names, in one request and no retries (offline fails at once)."""
    from urllib.parse import quote

    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    url = f"{_endpoint(endpoint)}/api/models/{repo}/tree/{quote(revision, safe='')}"
    files: list[str] = []
    params: dict | None = {"recursive": True, "expand": False}
    while url:
        r = http_backoff("GET", url, params=params, headers=build_hf_headers(), max_retries=0, timeout=15)
        hf_raise_for_status(r)
        files += [e["path"] for e in r.json() if e.get("type") == "file"]
        nxt = r.links.get("next", {}).get("url") if hasattr(r, "links") else None
        url, params = nxt, None
    return files


def _bar_class(console, label: str | None = None):
    """A tqdm-shaped class (what hf_hub_download's tqdm_class wants) drawing a Rich download bar."""

    class RichBar:
        def __init__(self, *args, total=None, initial=0, desc="", **kwargs):
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.n = initial or 0
            self.total = total
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task(f"fetching {label or desc}", total=total, completed=self.n)

        def update(self, n=1):
            self.n += n
            self.progress.update(self.task, completed=self.n)

        def close(self):
            self.progress.stop()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()
            return False

    return RichBar


def download(repo: str, filename: str, console=None, endpoint: str | None = None,
             cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    kw = {"tqdm_class": _bar_class(console, Path(filename).name)} if console is not None else {}
    return Path(hf_hub_download(repo, filename, endpoint=_endpoint(endpoint),
                                cache_dir=str(cache_dir) if cache_dir is not None else None, **kw))


def pull(spec: str, console=None, endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch REPO[:QUANT] from the hub (or bring the cached copy up to date); the local path."""
    from huggingface_hub.utils import logging as hf_logging

    repo, quant = parse_spec(spec)
    ep = _endpoint(endpoint)
    hf_logging.set_verbosity_error()  # its retry warnings would repeat what our one line says
    with _hub_errors(spec, repo, ep):
        files = list_repo_files(repo, ep)
        name = choose_file(repo, files, quant)
        return download(repo, name, console, ep, cache_dir)


def resolve(spec: str, console=None, endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """REPO[:QUANT] -> a local .gguf: the cached copy if there is one (no network), else `pull`."""
    repo, quant = parse_spec(spec)
    cached = find_cached(repo, quant, cache_dir)
    if cached is not None:
        return cached
    return pull(spec, console, endpoint, cache_dir)
