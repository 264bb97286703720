"""The memory plan: fit the context window into the memory the board gives the service.

Resident memory of a serving process is, to a good approximation:
- the weights: the GGUF file, memory-mapped, every page touched while generating;
- the KV cache: layers x KV heads x (key + value head size) x element size, per token of context;
- the KV cache is one pool shared by the requests that run at once (`parallel`);
- llama.cpp's compute buffer: the activations of one batch and its attention mask, and the
  logits of the rows sampled from (one per sequence; a whole batch's would be 150 MiB at batch
  256 for a 152k-token vocabulary). Flash attention keeps the attention scores out of it;
  without, they take n_ctx x batch x heads x 4 bytes (117 MiB at 8192 x 256 for the default);
- the runtime: Python, gRPC, numpy, llama-cpp-python and weights llama.cpp repacks for the CPU;
- saved KV caches kept in memory (sessions' and requests'; a configured budget).
BENCHMARKS.md compares the plan with measured peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
GIB = 1024**3
DEFAULT_CAP = 2 * GIB  # the appliance's budget when nothing else is tighter
OS_HEADROOM = 256 * MIB  # physical memory left to the system: kernel, journald, sshd, ...
AUTO_CONTEXT = 8192  # the context when none is configured, if the plan allows it
RUNTIME_BYTES = 192 * MIB  # measured: up to 163 MiB (Python, gRPC, numpy, repacked weights)
COMPUTE_PER_EMBD = 80  # compute buffer bytes per batch token and embedding value (measured <= 77)
COMPUTE_FIXED = 4 * MIB
MIN_CONTEXT = 512
CONTEXT_STEP = 256
CACHE_BYTES = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 values in 34 bytes
MAX_PARALLEL = 4  # the most requests the plan lets decode at once (2 cores: 2.5x the tokens/s)
PROMPT_ALLOWANCE = 512  # prompt tokens planned per running request, beside its answer


class MemoryPlanError(Exception):
    """Even the smallest useful context does not fit; the message gives the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from the GGUF metadata."""

    weights_bytes: int
    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    n_embd: int
    trained_context: int


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int
    kv_per_token: int
    context_length: int
    requested_context: int
    compute: int
    runtime: int
    cache_type: str
    sessions: int = 0
    budget_why: str = ""  # what set the budget
    parallel: int = 1  # requests that decode at once, sharing the KV cache

    @property
    def kv(self) -> int:
        return self.kv_per_token * self.context_length

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.runtime + self.sessions

    @property
    def shrunk(self) -> bool:
        return self.context_length < self.requested_context

    def describe(self) -> str:
        why = f" ({self.budget_why})" if self.budget_why else ""
        return (
            f"{self.total / MIB:.0f} MiB of {self.budget / MIB:.0f} MiB{why}: weights "
            f"{self.weights / MIB:.0f}, KV cache {self.kv / MIB:.0f} ({self.context_length} tokens "
            f"x {self.kv_per_token / 1024:.1f} KiB, {self.cache_type}, shared by {self.parallel} "
            f"requests at once), compute "
            f"{self.compute / MIB:.0f}, runtime {self.runtime / MIB:.0f}, saved caches "
            f"{self.sessions / MIB:.0f}"
        )


@dataclass(frozen=True, order=True)
class Budget:
    bytes: int
    why: str


def budget(
    mem_limit: int | None,
    mem_total: int | None = None,
    mem_available: int | None = None,
    cap: int = DEFAULT_CAP,
) -> Budget:
    """The tightest of the appliance's cap, the cgroup's memory limit, physical memory less
    room for the system, and the memory available at start-up (other programs keep theirs):
    a plan above physical memory ends in the OOM killer, and a restart loop."""
    limits = [Budget(cap, f"the appliance's {cap / MIB:.0f} MiB cap")]
    if mem_limit:
        limits.append(Budget(mem_limit, "the cgroup memory limit"))
    if mem_total:
        limits.append(
            Budget(
                mem_total - OS_HEADROOM,
                f"physical memory {mem_total / MIB:.0f} "
                f"MiB less {OS_HEADROOM / MIB:.0f} MiB for the system",
            )
        )
    if mem_available:
        limits.append(Budget(mem_available, "the memory available at start-up"))
    return min(limits)


def kv_bytes_per_token(shape: ModelShape, cache_type: str = "f16") -> int:
    per_value = CACHE_BYTES[cache_type]
    return int(
        shape.n_layer * shape.n_head_kv * (shape.key_length + shape.value_length) * per_value
    )


def plan(
    shape: ModelShape,
    requested_context: int,
    batch_size: int,
    budget_bytes: int,
    cache_type: str = "f16",
    sessions_bytes: int = 0,
    budget_why: str = "",
    parallel: int = 0,
    answer_tokens: int = 512,
) -> MemoryPlan:
    """The largest context up to the requested one that fits the budget, and how many
    requests decode at once (`parallel`, 0: as many as the context has room for, each with
    PROMPT_ALLOWANCE prompt tokens and `answer_tokens`, up to MAX_PARALLEL).

    Memory for saved session caches is given up first (they go to disk instead), then
    context. Raises MemoryPlanError when not even MIN_CONTEXT tokens fit.
    """
    per_token = kv_bytes_per_token(shape, cache_type)
    outputs = parallel or MAX_PARALLEL

    def compute_at(context: int) -> int:
        return compute_bytes(shape, batch_size, outputs, context)

    wanted = min(requested_context, shape.trained_context or requested_context)
    spare = budget_bytes - shape.weights_bytes - compute_at(wanted) - RUNTIME_BYTES
    sessions_bytes = max(0, min(sessions_bytes, spare - wanted * per_token))
    fixed = shape.weights_bytes + compute_at(0) + RUNTIME_BYTES + sessions_bytes
    grows = per_token + compute_at(1) - compute_at(0)  # a token of context costs both
    fits = (budget_bytes - fixed) // grows if budget_bytes > fixed else 0
    context = wanted if fits >= wanted else fits // CONTEXT_STEP * CONTEXT_STEP
    compute = compute_at(context)
    result = MemoryPlan(
        budget_bytes,
        shape.weights_bytes,
        per_token,
        context,
        requested_context,
        compute,
        RUNTIME_BYTES,
        cache_type,
        sessions_bytes,
        budget_why,
        parallel or max(1, min(MAX_PARALLEL, context // (PROMPT_ALLOWANCE + answer_tokens))),
    )
    if context < min(MIN_CONTEXT, wanted):
        why = f" ({budget_why})" if budget_why else ""
        raise MemoryPlanError(
            f"the model does not fit in {budget_bytes / MIB:.0f} MiB{why}: weights "
            f"{shape.weights_bytes / MIB:.0f} MiB + compute {compute / MIB:.0f} MiB (batch "
            f"{batch_size}) + runtime {RUNTIME_BYTES / MIB:.0f} MiB + saved caches "
            f"{sessions_bytes / MIB:.0f} MiB leave room for {max(fits, 0)} "
            f"tokens of context ({per_token / 1024:.1f} KiB each), fewer than {MIN_CONTEXT}; use "
            "a smaller model or batch size, or raise the memory limit"
        )
    return result


def compute_bytes(shape: ModelShape, batch_size: int, outputs: int, context: int) -> int:
    """llama.cpp's compute and output buffers, with flash attention: per batch token its
    activations (measured 47-77 x n_embd bytes) and its attention mask row (2 bytes per cell of
    context), `outputs` rows of logits (one per sequence), and a few MiB more."""
    per_batch_token = 2 * context + COMPUTE_PER_EMBD * shape.n_embd
    return batch_size * per_batch_token + 4 * outputs * shape.n_vocab + COMPUTE_FIXED
