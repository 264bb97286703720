"""Prove a ggml CPU variant in a child process before any process of ours trusts it.

ggml scores a variant by the instructions the CPU reports, not by what runs: on some Xeons the
top-scored `sapphirerapids` variant dies with SIGILL in its AMX matmul (llama.cpp #26954), and
only once a prompt-sized batch reaches it. So each candidate runs, in a child process, the
matrix multiplications the model will run: its weight types and row lengths, at batch 1 and at
a prompt-sized batch, with the weights in every buffer type ggml would put them in (AMX,
repacked, plain), exactly as llama.cpp decides that (the device's supports_op). A child that
dies, hangs or gets numbers that differ from the plainest variant's rules the candidate out.
backend.py decides what to try; the outcomes are remembered here, keyed by everything that could
change them (CPU, kernel, build, model), so a later start-up runs no child at all.

The child is `python -m edge_llm.cpucheck`; it imports only ctypes and numpy, never llama_cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llm import hardware

BATCHES = (1, 100)  # a token being generated; a prompt batch (3 whole 32-row AMX tiles + 4)
THREADS = 2  # several threads: AMX tile configuration and repacked GEMMs are per thread
TIMEOUT = 30.0  # seconds for one child; under a second is usual, a few on a Pi
TOLERANCE = 0.02  # relative L2 distance from the reference; a broken kernel is near 1
_KEEP = 8  # remembered keys (CPU x build x model types) in the verdict file

# ggml_type values (ggml.h), for the cases run when no model is named.
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 0, 1, 2, 3, 6, 8, 12, 13, 14
# The weight types ggml_quantize_chunk() can make (any other aborts it): F16, BF16, every
# quantization a GGUF file holds (not Q8_1 and Q8_K, which only activations use).
QUANTIZABLE = frozenset(
    {
        1,
        30,
        2,
        3,
        6,
        7,
        8,
        10,
        11,
        12,
        13,
        14,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        29,
        34,
        35,
        39,
        40,
        41,
        42,
    }
)


@dataclass(frozen=True, order=True)
class Case:
    """One weight matrix shape: `rows` rows of `k` values of ggml type `type`."""

    type: int
    k: int
    rows: int


DEFAULT_CASES = tuple(Case(t, 1024, 128) for t in (F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K))


# -- the ggml library, through ctypes -------------------------------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class _GgufParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class _TensorHead(ctypes.Structure):
    """The first fields of struct ggml_tensor, unchanged since ggml's start."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


def _ggml(lib_dir: Path) -> ctypes.CDLL:
    """libggml (the soname libllama links) with its signatures; it brings libggml-base."""
    g = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "ggml_init": (p, [_InitParams]),
        "ggml_free": (None, [p]),
        "ggml_new_tensor_2d": (p, [p, ctypes.c_int, i64, i64]),
        "ggml_mul_mat": (p, [p, p, p]),
        "ggml_new_graph": (p, [p]),
        "ggml_build_forward_expand": (None, [p, p]),
        "ggml_nbytes": (sz, [p]),
        "ggml_row_size": (sz, [ctypes.c_int, i64]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_tensor_overhead": (sz, []),
        "ggml_graph_overhead": (sz, []),
        "ggml_quantize_chunk": (sz, [ctypes.c_int, p, p, i64, i64, i64, p]),
        "ggml_get_tensor": (p, [p, ctypes.c_char_p]),
        "gguf_init_from_file": (p, [ctypes.c_char_p, _GgufParams]),
        "gguf_free": (None, [p]),
        "gguf_get_n_tensors": (i64, [p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [p, i64]),
        "ggml_backend_load": (p, [ctypes.c_char_p]),
        "ggml_backend_reg_dev_get": (p, [p, sz]),
        "ggml_backend_reg_get_proc_address": (p, [p, ctypes.c_char_p]),
        "ggml_backend_dev_init": (p, [p, ctypes.c_char_p]),
        "ggml_backend_dev_buffer_type": (p, [p]),
        "ggml_backend_dev_supports_op": (ctypes.c_bool, [p, p]),
        "ggml_backend_buft_name": (ctypes.c_char_p, [p]),
        "ggml_backend_alloc_ctx_tensors_from_buft": (p, [p, p]),
        "ggml_backend_buffer_free": (None, [p]),
        "ggml_backend_tensor_set": (None, [p, p, sz, sz]),
        "ggml_backend_tensor_get": (None, [p, p, sz, sz]),
        "ggml_backend_graph_compute": (ctypes.c_int, [p, p]),
        "ggml_backend_free": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(g, name)
        fn.restype, fn.argtypes = restype, argtypes
    return g


def type_name(g: ctypes.CDLL, ggml_type: int) -> str:
    return (g.ggml_type_name(ggml_type) or b"?").decode()


def model_cases(lib_dir: Path, path: Path) -> tuple[Case, ...]:
    """The weight matrices of a GGUF file, one Case per type, row length and row pattern.

    Row counts are cut to at most 256 keeping their remainder by 128, so every divisibility
    rule a buffer type applies (AMX: 32 rows; repacking: 4, 8, 16) decides as for the model.
    """
    g = _ggml(lib_dir)
    meta = ctypes.c_void_p()
    gguf = g.gguf_init_from_file(str(path).encode(), _GgufParams(True, ctypes.pointer(meta)))
    if not gguf:
        return DEFAULT_CASES  # llama.cpp will say what is wrong with the file when it loads it
    try:
        cases = set()
        for i in range(g.gguf_get_n_tensors(gguf)):
            tensor = g.ggml_get_tensor(meta, g.gguf_get_tensor_name(gguf, i))
            if not tensor:
                continue
            head = _TensorHead.from_address(tensor)
            k, rows = head.ne[0], head.ne[1]
            if rows > 1 and head.type in QUANTIZABLE:  # a matrix (F32: norms, biases)
                cases.add(Case(head.type, k, rows if rows <= 256 else 128 + rows % 128))
        return tuple(sorted(cases)) or DEFAULT_CASES
    finally:
        g.gguf_free(gguf)
        g.ggml_free(meta)


# -- the parent's side -----------------------------------------------------------------------


class CheckError(Exception):
    """The variants could not even be scored (a broken install)."""


# Deaths that say the variant's code cannot run on this CPU, every time: remembered. Anything
# else (a timeout on a busy board, SIGKILL from the OOM killer, an exit) is tried again.
LASTING_SIGNALS = frozenset(
    {signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}
)


@dataclass(frozen=True)
class Outcome:
    """What one child did: its results by case, or why it failed."""

    results: Mapping[str, Any]
    failure: str = ""  # "" = ran to the end
    lasting: bool = True  # the same would happen again: worth remembering


def _child(*args: str) -> tuple[list[str], dict[str, str]]:
    """The child's command line and environment: the parent's own edge_llm (-P: not one that
    happens to be in the working directory), with the parent's environment otherwise."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-P", "-m", "edge_llm.cpucheck", *args]
    return cmd, {**os.environ, "PYTHONPATH": path}


def scores(lib_dir: Path, variants: Mapping[str, Path]) -> dict[str, int]:
    """ggml_backend_score() of each variant: 0 when the CPU lacks its instructions, and for
    one that crashes when loaded. Asked in a child: loading a variant runs its initialisers."""
    found: dict[str, int] = {}
    left = dict(variants)
    while left:
        cmd, env = _child("scores", str(lib_dir), *map(str, left.values()))
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CheckError(f"scoring the CPU variants failed: {e}") from None
        by_path = dict(line.split(" ", 1)[::-1] for line in done.stdout.splitlines())
        for name, path in list(left.items()):
            if str(path) not in by_path:
                break
            score = by_path[str(path)]
            found[name] = int(score) if score.lstrip("-").isdigit() else 0
            del left[name]
        if left and done.returncode == 0:
            raise CheckError(f"scoring the CPU variants failed: {_ggml_said(done.stderr)}")
        if left:  # the next one killed the child
            found[next(iter(left))] = 0
            del left[next(iter(left))]
    return found


class Trial:
    """One variant running the cases in a child process, started at once."""

    def __init__(self, lib_dir: Path, variant: Path, cases: Iterable[Case]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="edge-llm-cpucheck-")
        self._out = Path(self._dir.name) / "results.npz"
        spec = json.dumps([[c.type, c.k, c.rows] for c in cases])
        cmd, env = _child("run", str(lib_dir), str(variant), self._out.name, str(THREADS), spec)
        self._proc: subprocess.Popen[str] | None = None
        self._error = ""
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=self._dir.name,
            )
        except OSError as e:
            self._error = f"could not be started: {e}"

    def outcome(self) -> Outcome:
        try:
            return self._outcome()
        finally:
            self.close()

    def _outcome(self) -> Outcome:
        if self._proc is None:
            return Outcome({}, self._error, lasting=False)
        try:
            out, err = self._proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate()
            return Outcome({}, f"did not finish in {TIMEOUT:g} s{_during(out)}", lasting=False)
        rc = self._proc.returncode
        if rc < 0:
            try:
                sig = signal.Signals(-rc)
            except ValueError:
                return Outcome({}, f"killed by signal {-rc}{_during(out)}", lasting=False)
            # An abort is a failed GGML_ASSERT: its message is ggml's last line.
            why = f" ({_ggml_said(err)})" if sig == signal.SIGABRT and _ggml_said(err) else ""
            return Outcome({}, f"killed by {sig.name}{_during(out)}{why}", sig in LASTING_SIGNALS)
        if rc != 0:
            return Outcome({}, f"failed{_during(out)}: {_ggml_said(err) or f'exit {rc}'}", False)
        try:
            import numpy as np

            with np.load(self._out) as data:
                return Outcome({name: data[name] for name in data.files})
        except (OSError, ValueError) as e:
            return Outcome({}, f"its results could not be read: {e}", lasting=False)

    def close(self) -> None:
        """Stop the child if it still runs; remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._dir.cleanup()


def differs(candidate: Outcome, reference: Outcome) -> str:
    """Why the candidate's numbers are wrong, or "" when they match the reference's.

    Results are keyed "<type>/<k>/<rows>/<batch>/<buffer type>"; the reference ran each case
    with plain weights ("CPU"), which every buffer type of the candidate is held to."""
    import numpy as np

    plain = {key for key in candidate.results if key.endswith("/CPU")}
    if missing := sorted(set(reference.results) - plain):
        return f"did not run {_describe(missing[0])}"
    for key, got in candidate.results.items():
        want = reference.results.get(key.rsplit("/", 1)[0] + "/CPU")
        if want is None:
            return f"ran {_describe(key)}, which the reference could not"
        scale = float(np.linalg.norm(want)) or 1.0
        error = float(np.linalg.norm(got - want)) / scale
        if not error <= TOLERANCE:  # also NaN
            return f"wrong numbers in {_describe(key)}: {error:.3g} from the reference"
    return ""


def _during(stdout: str) -> str:
    steps = [line[5:] for line in stdout.splitlines() if line.startswith("step ")]
    return f" during {steps[-1]}" if steps else ""


def _ggml_said(stderr: str) -> str:
    """The last line of ggml's output, not of Python's fault handler (the service has it on)."""
    lines = [line.strip() for line in stderr.split("Fatal Python error")[0].splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def _describe(key: str) -> str:
    """'q4_K/896/128/100/AMX' -> 'a 100-token q4_K matmul with AMX weights'."""
    name, _k, _rows, batch, buft = key.split("/")
    where = "" if buft == "CPU" else f" with {buft} weights"
    return f"a {batch}-token {name} matmul{where}"


# -- what is remembered ---------------------------------------------------------------------


def key(lib_dir: Path, variants: Mapping[str, Path], model: Path | None) -> str:
    """Everything a verdict depends on: the CPU (model, flags, what the kernel grants), the
    kernel, the build, the model file (each file's size and time; the model's stand for its
    weight types, which take a parse of the file to read: a remembered start skips it) and
    this checker itself."""
    board = hardware.detect()
    parts: list[object] = [board.model, sorted(board.features), _hwcaps(), platform.release()]
    files = [*sorted(lib_dir.glob("libggml*")), *variants.values(), *([model] if model else [])]
    for path in [*files, Path(__file__)]:
        try:
            st = path.stat()
            parts.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            parts.append([str(path), None])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _hwcaps() -> list[int]:
    """AT_HWCAP and AT_HWCAP2: what ggml's ARM scoring reads (and QEMU's -cpu changes)."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except AttributeError:
        return []
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return [getauxval(16), getauxval(26)]


def verdict_file() -> Path:
    """Beside the models: systemd's CacheDirectory, else the XDG cache."""
    if os.environ.get("CACHE_DIRECTORY"):
        base = Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-llm"
    return base / "cpu-variants.json"


class Verdicts:
    """The remembered scores and outcomes for one key: variant -> "" (passed) or the cause."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        try:
            self._all: dict[str, Any] = json.loads(path.read_text())
            entry = self._all.get(key, {})
        except (OSError, ValueError, AttributeError):
            self._all, entry = {}, {}
        self.scores: dict[str, int] | None = entry.get("scores")
        self.outcomes: dict[str, str] = dict(entry.get("outcomes", {}))

    def save(self) -> str:
        """Write them (atomically); "" or why they could not be kept."""
        self._all.pop(self.key, None)
        self._all[self.key] = {
            "scores": self.scores,
            "outcomes": self.outcomes,
            "tested": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        kept = dict(list(self._all.items())[-_KEEP:])
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(kept, indent=1))
            tmp.replace(self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return str(e)
        return ""


# -- the child's side ------------------------------------------------------------------------


def _step(text: str) -> None:
    print(f"step {text}", flush=True)


def _child_scores(lib_dir: Path, paths: list[str]) -> None:
    """Prints "<score> <path>" per variant, each as soon as it is known."""
    _ggml(lib_dir)  # every variant needs libggml-base in the process
    for path in paths:
        lib = ctypes.CDLL(path)
        score = getattr(lib, "ggml_backend_score", None)
        if score is not None:
            score.restype = ctypes.c_int
        print(f"{int(score()) if score else 0} {path}", flush=True)


def _child_run(lib_dir: Path, variant: str, out: str, threads: int, cases: list[Case]) -> None:
    _step("loading the variant")
    import numpy as np

    g = _ggml(lib_dir)
    reg = g.ggml_backend_load(variant.encode())
    if not reg:
        raise SystemExit(f"ggml could not load {variant}")
    dev = g.ggml_backend_reg_dev_get(reg, 0)
    backend = g.ggml_backend_dev_init(dev, None)
    if not dev or not backend:
        raise SystemExit(f"{variant} gave no CPU device")
    set_threads = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if set_threads:
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)(set_threads)(backend, threads)
    plain = g.ggml_backend_dev_buffer_type(dev)
    bufts = [plain]
    extra = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if extra:
        get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(extra)
        listed = get_extra(dev)
        n = 0
        while listed[n]:
            bufts.insert(n, listed[n])  # llama.cpp tries them before the plain one
            n += 1

    results: dict[str, Any] = {}
    for case in cases:
        name = type_name(g, case.type)
        rng = np.random.default_rng([case.type, case.k, case.rows])  # the same in every child
        weights = rng.standard_normal((case.rows, case.k), dtype=np.float32)
        inputs = {b: rng.standard_normal((b, case.k), dtype=np.float32) for b in BATCHES}
        packed = np.empty(g.ggml_row_size(case.type, case.k) * case.rows, dtype=np.uint8)
        imatrix = np.ones(case.k, dtype=np.float32)  # for types that need one
        g.ggml_quantize_chunk(
            case.type,
            weights.ctypes.data,
            packed.ctypes.data,
            0,
            case.rows,
            case.k,
            imatrix.ctypes.data,
        )
        for buft in bufts:
            buft_name = g.ggml_backend_buft_name(buft).decode()
            overhead = g.ggml_tensor_overhead() * (1 + 2 * len(BATCHES)) + g.ggml_graph_overhead()
            wctx = g.ggml_init(_InitParams(g.ggml_tensor_overhead(), None, True))
            actx = g.ggml_init(_InitParams(overhead * 2, None, True))
            if not wctx or not actx:
                raise SystemExit("ggml_init failed")
            w = g.ggml_new_tensor_2d(wctx, case.type, case.k, case.rows)
            xs = {b: g.ggml_new_tensor_2d(actx, F32, case.k, b) for b in BATCHES}
            ys = {b: g.ggml_mul_mat(actx, w, x) for b, x in xs.items()}
            wbuf = g.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
            abuf = g.ggml_backend_alloc_ctx_tensors_from_buft(actx, plain)
            try:
                # Where llama.cpp would not put these weights, neither do we.
                if not all(g.ggml_backend_dev_supports_op(dev, y) for y in ys.values()):
                    continue
                _step(f"loading {name} weights into {buft_name}")
                g.ggml_backend_tensor_set(w, packed.ctypes.data, 0, packed.nbytes)
                for b, x in xs.items():
                    what = f"{name}/{case.k}/{case.rows}/{b}/{buft_name}"
                    _step(_describe(what))
                    g.ggml_backend_tensor_set(x, inputs[b].ctypes.data, 0, inputs[b].nbytes)
                    graph = g.ggml_new_graph(actx)
                    g.ggml_build_forward_expand(graph, ys[b])
                    if g.ggml_backend_graph_compute(backend, graph) != 0:
                        raise SystemExit(f"ggml could not compute {_describe(what)}")
                    y = np.empty((b, case.rows), dtype=np.float32)
                    g.ggml_backend_tensor_get(ys[b], y.ctypes.data, 0, y.nbytes)
                    results[what] = y
            finally:
                for buf in (wbuf, abuf):
                    if buf:
                        g.ggml_backend_buffer_free(buf)
                g.ggml_free(wctx)
                g.ggml_free(actx)
    g.ggml_backend_free(backend)
    np.savez(out, **results)
    _step("done")


def main(argv: list[str]) -> None:
    command, lib_dir = argv[0], Path(argv[1])
    if command == "scores":
        _child_scores(lib_dir, argv[2:])
    elif command == "run":
        variant, out, threads, spec = argv[2:6]
        cases = [Case(*c) for c in json.loads(spec)]
        _child_run(lib_dir, variant, out, int(threads), cases)
    else:
        raise SystemExit(f"usage: python -m edge_llm.cpucheck scores|run LIB_DIR ...: {argv}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
