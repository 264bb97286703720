"""The ggml CPU backend: load the variant of it that fits this CPU, before any model loads.

scripts/bootstrap builds llama.cpp with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS, which makes
one shared library per CPU generation (x64, sse42, haswell, skylakex, icelake, zen4, ...; on ARM
armv8.0 ... armv9.2). llama-cpp-python's wheel installs them in site-packages/bin/ and loads
none, so a model load fails with "no backends are loaded" until one is loaded here. Each variant
exports ggml_backend_score(): 0 when this CPU lacks its instructions, higher for newer ones. The
best score wins; a forced variant that scores 0 is refused, so it never dies with SIGILL. A build
with its CPU backend linked in (one native variant) needs nothing and is reported as "native".
"""

from __future__ import annotations

import _ctypes
import ctypes
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

PREFIX = "libggml-cpu-"


class BackendError(Exception):
    """The requested CPU variant is unknown, or this CPU cannot run it."""


@dataclass(frozen=True)
class CpuBackend:
    variant: str  # "zen4", "haswell", ... or "native"
    path: str
    scores: dict[str, int]  # every variant of this build: 0 = this CPU cannot run it
    forced: bool = False

    @property
    def why(self) -> str:
        if self.variant == "native":
            return "a native build: its one CPU backend is linked in"
        runnable = sorted((v for v, s in self.scores.items() if s), key=self.scores.__getitem__)
        how = "forced by configuration" if self.forced else "the highest score ggml gives"
        return f"{how}; this CPU can run {', '.join(runnable)}"


_loaded: CpuBackend | None = None


def _dirs() -> tuple[Path, Path]:
    """llama_cpp/lib (libggml, libllama) and site-packages/bin (the variants)."""
    spec = find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise BackendError("llama-cpp-python is not installed; run scripts/bootstrap")
    package = Path(spec.origin).parent
    return package / "lib", package.parent / "bin"


def variants() -> dict[str, Path]:
    _, bin_dir = _dirs()
    found = sorted(bin_dir.glob(f"{PREFIX}*.so"))
    return {p.name.removeprefix(PREFIX).removesuffix(".so"): p for p in found}


def _score(path: Path) -> int:
    lib = ctypes.CDLL(str(path))
    try:
        score = lib.ggml_backend_score
        score.restype = ctypes.c_int
        return int(score())
    except AttributeError:
        return 0
    finally:
        _ctypes.dlclose(lib._handle)


def load(variant: str = "auto") -> CpuBackend:
    """Load the best (or the named) CPU variant once per process; later calls return it."""
    global _loaded
    if _loaded is not None:
        if variant not in ("auto", _loaded.variant):
            raise BackendError(
                f"CPU variant {_loaded.variant} is already loaded in this process; "
                f"{variant} needs a process of its own"
            )
        return _loaded
    lib_dir, _ = _dirs()
    found = variants()
    if not found:
        if variant not in ("auto", "native"):
            raise BackendError(f"this llama.cpp build has no CPU variants to choose from; "
                               f"{variant!r} cannot be loaded (run scripts/bootstrap)")  # fmt: skip
        _loaded = CpuBackend("native", str(lib_dir), {})
        return _loaded
    # The soname libllama links, not libggml.so: the wheel holds two copies of the library, and
    # a backend registered in the other copy is invisible to llama.cpp. Loading it first also
    # puts libggml-base in the process, which every variant needs.
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    scores = {name: _score(path) for name, path in found.items()}
    if variant == "auto":
        chosen = max(scores, key=scores.__getitem__)
        if scores[chosen] == 0:
            raise BackendError(f"this CPU can run none of the CPU variants: {', '.join(found)}")
    elif variant not in found:
        raise BackendError(f"unknown CPU variant {variant!r}; this build has: {', '.join(found)}")
    elif scores[variant] == 0:
        runnable = [v for v, s in scores.items() if s]
        raise BackendError(
            f"this CPU cannot run the {variant} variant (it lacks instructions that variant "
            f"uses); variants it can run: {', '.join(runnable) or 'none'}"
        )
    else:
        chosen = variant
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(str(found[chosen]).encode()):
        raise BackendError(f"ggml could not load {found[chosen]}")
    _loaded = CpuBackend(chosen, str(found[chosen]), scores, forced=variant != "auto")
    return _loaded
