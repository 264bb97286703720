"""The ggml CPU backend: load the variant of it that fits this CPU, before any model loads.

scripts/bootstrap builds llama.cpp with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS, which makes
one shared library per CPU generation (x64, sse42, haswell, skylakex, icelake, zen4, ...; on ARM
armv8.0 ... armv9.2). llama-cpp-python's wheel installs them in site-packages/bin/ and loads
none, so a model load fails with "no backends are loaded" until one is loaded here. Each variant
exports ggml_backend_score(): 0 when this CPU lacks its instructions, higher for newer ones.

A score is what the CPU claims, not what runs (an AMX Xeon dies in the top-scored variant), so
no variant is loaded here before it passed a self-test in a child process (cpucheck.py): the
candidates are tried best score first, and the first that passes is loaded. A forced variant is
tested too, and refused with the reason if it fails; one the CPU cannot run at all is refused
without a try. A build with its CPU backend linked in (one native variant) is reported as
"native".
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from edge_llm import cpucheck

log = logging.getLogger(__name__)

PREFIX = "libggml-cpu-"


class BackendError(Exception):
    """The requested CPU variant is unknown, this CPU cannot run it, or it failed its test."""


@dataclass(frozen=True)
class CpuBackend:
    variant: str  # "zen4", "haswell", ... or "native"
    path: str
    scores: dict[str, int]  # every variant of this build: 0 = this CPU cannot run it
    forced: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # variant -> how its self-test failed
    tested: str = ""  # "tested now", or "verdict remembered" from an earlier start

    @property
    def why(self) -> str:
        if self.variant == "native":
            return "a native build: its one CPU backend is linked in"
        if self.forced:
            how = f"forced by configuration; it passed its self-test, {self.tested}"
        else:
            how = f"the best-scored variant that passed a self-test on this CPU, {self.tested}"
        runnable = sorted((v for v, s in self.scores.items() if s), key=self.scores.__getitem__)
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


def load(variant: str = "auto", model: Path | None = None) -> CpuBackend:
    """Load the best (or the named) CPU variant that passes its self-test on `model`'s weight
    types (common types when None), once per process; later calls return it."""
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
            raise BackendError(
                f"this llama.cpp build has no CPU variants to choose from; "
                f"{variant!r} cannot be loaded (run scripts/bootstrap)"
            )
        _loaded = CpuBackend("native", str(lib_dir), {})
        return _loaded
    chosen = _choose(lib_dir, found, variant, model)
    # The soname libllama links, not libggml.so: the wheel holds two copies of the library, and
    # a backend registered in the other copy is invisible to llama.cpp.
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(chosen.path.encode()):
        raise BackendError(f"ggml could not load {chosen.path}")
    _loaded = chosen
    return _loaded


def _choose(lib_dir: Path, found: dict[str, Path], variant: str, model: Path | None) -> CpuBackend:
    verdicts = cpucheck.Verdicts(cpucheck.verdict_file(), cpucheck.key(lib_dir, found, model))
    try:
        scores = verdicts.scores or cpucheck.scores(lib_dir, found)
    except cpucheck.CheckError as e:
        raise BackendError(f"{e}; install edge-llm again") from None
    verdicts.scores = scores
    runnable = sorted((v for v in found if scores.get(v)), key=scores.__getitem__, reverse=True)
    if variant == "auto":
        if not runnable:
            raise BackendError(f"this CPU can run none of the CPU variants: {', '.join(found)}")
    elif variant not in found:
        raise BackendError(f"unknown CPU variant {variant!r}; this build has: {', '.join(found)}")
    elif not scores.get(variant):
        raise BackendError(
            f"this CPU cannot run the {variant} variant (it lacks instructions that variant "
            f"uses); variants it can run: {', '.join(runnable) or 'none'}"
        )
    test = _SelfTest(lib_dir, found, model, runnable[-1], verdicts)
    try:
        candidates = runnable if variant == "auto" else [variant]
        chosen = next((v for v in candidates if not test.verdict(v)), None)
        if chosen is None and variant != "auto":
            passed = [v for v in runnable if not test.verdict(v)]
            raise BackendError(
                f"the {variant} variant failed its self-test on this CPU: "
                f"{test.rejected[variant]}; variants that passed: {', '.join(passed) or 'none'} "
                "(or leave cpu_variant = auto)"
            )
        if chosen is None:
            verdicts.outcomes.clear()  # whatever broke everything, the next start tries again
            causes = "; ".join(f"{v}: {cause}" for v, cause in test.rejected.items())
            raise BackendError(f"no CPU variant passed its self-test on this CPU ({causes})")
    finally:
        test.finish()
    return CpuBackend(
        chosen,
        str(found[chosen]),
        scores,
        forced=variant != "auto",
        rejected=test.rejected,
        tested=test.how,
    )


class _SelfTest:
    """Verdicts for variants, remembered or run now. A variant run now is compared with the
    `reference`, the plainest variant this CPU runs, which runs beside the first one.

    Only what would come out the same again is remembered (each at once, so a start that is
    killed keeps what it learnt): a pass compared with the reference, a death by SIGILL and
    the like, wrong numbers; not a timeout or an unexplained exit."""

    def __init__(
        self,
        lib_dir: Path,
        found: dict[str, Path],
        model: Path | None,
        reference: str,
        verdicts: cpucheck.Verdicts,
    ) -> None:
        self._lib_dir, self._found, self._model = lib_dir, found, model
        self._cases: tuple[cpucheck.Case, ...] | None = None
        self._reference_name = reference
        self._reference: cpucheck.Trial | None = None
        self._reference_outcome: cpucheck.Outcome | None = None
        self._verdicts = verdicts
        self._unsaved = ""  # why the verdicts could not be written, once
        self.rejected: dict[str, str] = {}
        self._ran: list[str] = []
        self._started = time.monotonic()

    def verdict(self, variant: str) -> str:
        """ "" when the variant passed, else why it failed."""
        if variant in self._verdicts.outcomes:
            cause = self._verdicts.outcomes[variant]
        else:
            cause, lasting = self._run(variant)
            if lasting:
                self._verdicts.outcomes[variant] = cause
                self._unsaved = self._unsaved or self._verdicts.save()
        if cause:
            self.rejected[variant] = cause
        return cause

    def _run(self, variant: str) -> tuple[str, bool]:
        """Why the variant failed ("" if it passed), and whether that is worth remembering."""
        self._ran.append(variant)
        if variant == self._reference_name:
            ref = self._reference_result()
            return ref.failure, ref.lasting
        trial = cpucheck.Trial(self._lib_dir, self._found[variant], self._test_cases())
        if self._reference is None and self._reference_outcome is None:
            self._reference = cpucheck.Trial(
                self._lib_dir, self._found[self._reference_name], self._test_cases()
            )
        outcome = trial.outcome()
        if outcome.failure:
            return outcome.failure, outcome.lasting
        ref = self._reference_result()
        if ref.failure:
            log.warning(
                "the reference CPU variant %s failed its self-test (%s): %s is only "
                "known to run, not to compute right",
                self._reference_name,
                ref.failure,
                variant,
            )
            return "", False
        return cpucheck.differs(outcome, ref), True

    def _test_cases(self) -> tuple[cpucheck.Case, ...]:
        if self._cases is None:  # the model's weight matrices: a parse of the file
            model = self._model
            self._cases = (
                cpucheck.model_cases(self._lib_dir, model) if model else cpucheck.DEFAULT_CASES
            )
        return self._cases

    def _reference_result(self) -> cpucheck.Outcome:
        """The reference's outcome: the one running beside a candidate, or a new run."""
        if self._reference_outcome is None:
            trial = self._reference or cpucheck.Trial(
                self._lib_dir, self._found[self._reference_name], self._test_cases()
            )
            self._reference = None
            self._reference_outcome = trial.outcome()
        return self._reference_outcome

    def finish(self) -> None:
        """Stop a reference still running; say how long the self-test took."""
        if self._reference is not None:
            self._reference.close()
            self._reference = None
        if not self._ran:
            return
        log.info(
            "CPU variant self-test: ran %s in %.1f s",
            ", ".join(self._ran),
            time.monotonic() - self._started,
        )
        if self._unsaved or (problem := self._verdicts.save()):
            log.warning(
                "CPU variant verdicts not remembered (%s): the self-test runs again at "
                "the next start",
                self._unsaved or problem,
            )

    @property
    def how(self) -> str:
        return "tested now" if self._ran else "verdict remembered"
