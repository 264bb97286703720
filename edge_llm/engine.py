"""The model: load a GGUF file with llama-cpp-python, tokenize prompts, and offer the steps
that continuous batching is made of (decode a batch, sample a row, move sequences' caches).

This is the only module that imports llama_cpp. The engine's context is driven by one thread
(the scheduler's worker, through decoding.py and kvstates.py); tokenizing is safe from any
thread, as it only reads the vocabulary.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# llama.cpp's OpenMP threads spin (300k rounds) waiting for the next graph. Beside any other busy
# process (a kiosk's own browser) the spinning thread takes the core the working one needs and
# decoding falls to a quarter; a short spin costs nothing measurable idle (BENCHMARKS.md). libgomp
# reads this once, when llama_cpp loads it, so it must be set before the import.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "2000"

import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_llm import backend
from edge_llm.memory import ModelShape
from edge_llm.types import (
    ChatMessage,
    GenerateRequest,
    ModelInfo,
    Part,
    RequestError,
    Sampling,
)

log = logging.getLogger(__name__)

_PENALTY_LAST_N = 64  # llama-cpp-python's window for the repeat penalties
_PLACEHOLDER = re.compile("\x00([0-9]+)\x00")  # a message's content in the rendered template


class ModelLoadError(Exception):
    """llama.cpp refused the file."""

    @classmethod
    def of(cls, path: Path, error: Exception) -> ModelLoadError:
        return cls(
            f"llama.cpp could not load {path} ({error}); the file may be truncated, damaged or "
            "of an architecture this llama.cpp does not know"
        )


@dataclass(frozen=True)
class EngineSettings:
    context_length: int  # cells in the KV pool; also the most one request may use
    batch_size: int
    threads: int
    threads_batch: int
    sequences: int = 1  # sequences in the pool: one per request decoding at once


class EngineError(RuntimeError):
    """llama.cpp failed a step; the requests in it end with an error."""


class Sampler:
    """One sequence's sampler chain (llama.cpp's), in llama-cpp-python's order, so a stream
    alone samples as Llama.generate() did: penalties over the last 64 tokens, then top-k first
    (it cuts 152k candidates to k before anything sorts), typical, top-p, min-p, temperature,
    and a seeded draw; temperature 0 is a plain argmax."""

    def __init__(self, n_vocab: int, s: Sampling, seed: int) -> None:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = functools.partial(llama_cpp.llama_sampler_chain_add, chain)
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, _PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            )
        )
        if s.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        self._chain: Any = chain

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)  # and everything in the chain
            self._chain = None


class Engine:
    """The model and one llama.cpp context whose KV cache is a single pool of
    `context_length` cells shared by `sequences` sequences (kv_unified): several requests
    decode in one llama_decode (decoding.py drives it), each from its own sequence."""

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        self.path = path
        self.settings = settings
        backend.load(model=path)  # no-op when the server already loaded its choice
        verbose = log.isEnabledFor(logging.DEBUG)
        # llama-cpp-python prints llama.cpp's load log to stderr at this logger's level.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        try:
            self._model = LlamaModel(path_model=str(path), params=params, verbose=verbose)
            self._ctx = LlamaContext(
                model=self._model, params=self._context_params(), verbose=verbose
            )
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError.of(path, e) from None
        model = self._model.model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = self._model.n_vocab()
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(settings.batch_size, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(64)
        # Recurrent and hybrid models keep a state that cannot be cut back to a prefix.
        self.kv_restorable = not (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        self._metadata = self._model.metadata()
        self._formatter = self._chat_formatter()
        self.info = self._model_info()

    def _context_params(self) -> Any:
        s = self.settings
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = s.context_length
        p.n_batch = p.n_ubatch = s.batch_size
        p.n_seq_max = s.sequences
        p.kv_unified = True  # one pool: a sequence may grow into what the others leave
        # Each sequence samples at most one token per step: logits for that many rows (llama.cpp
        # wants room for every sequence), not for a whole batch (152k-token vocabularies make
        # that 150 MiB at batch 256).
        p.n_outputs_max = s.sequences
        p.n_threads = s.threads
        p.n_threads_batch = s.threads_batch
        p.no_perf = True
        # Flash attention: no n_ctx x batch x heads score matrix (128 of the 135 MiB of compute
        # buffer at 8192 x 256), and faster decoding (BENCHMARKS.md).
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        return p

    # -- prompts ---------------------------------------------------------------------------

    def prompt_tokens(self, request: GenerateRequest) -> list[int]:
        """The tokens the request's prompt becomes; refused when they leave no room to answer."""
        tokens = self.tokenize(request.prompt, request.messages)
        n_ctx = self.settings.context_length
        if len(tokens) >= n_ctx:
            field = "prompt" if request.prompt is not None else "messages"
            raise RequestError(
                f"{field} is {len(tokens)} tokens; the context window holds {n_ctx} tokens "
                "for prompt and answer together: shorten it"
            )
        if not tokens:
            raise RequestError("prompt gives no tokens")
        return tokens

    def tokenize(self, prompt: str | None, messages: Sequence[ChatMessage]) -> list[int]:
        if prompt is not None:
            return self._tokenize(prompt.encode(), add_bos=True, special=True)
        if self._formatter is None:
            raise RequestError(
                f"the model {self.path.name} has no chat template; send a raw prompt instead"
            )
        # The template is rendered around placeholders, then its own text is tokenized with
        # special tokens (<|im_start|>, BOS, ...) and each message's content as plain text: a
        # user who types "<|im_start|>system" gets those characters, not a system turn.
        try:
            placeholders: list[Any] = [
                {"role": m.role, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)
            ]
            text = self._formatter(messages=placeholders).prompt
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise RequestError(f"messages: the model's chat template refused them: {e}") from None
        tokens: list[int] = []
        for n, piece in enumerate(_PLACEHOLDER.split(text)):
            if n % 2:  # a placeholder's number
                tokens += self._tokenize(
                    messages[int(piece)].content.encode(), add_bos=False, special=False
                )
            elif piece:
                tokens += self._tokenize(piece.encode(), add_bos=False, special=True)
        return tokens

    def _tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        tokens: list[int] = self._model.tokenize(text, add_bos=add_bos, special=special)
        return tokens

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self._metadata.get("tokenizer.chat_template")
        if not template:
            return None

        def text_of(token: int) -> str:
            return self.piece(token, special=True).decode(errors="replace") if token >= 0 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=text_of(self._model.token_eos()),
            bos_token=text_of(self._model.token_bos()),
            add_generation_prompt=True,
        )

    # -- steps (decoding.py) ----------------------------------------------------------------

    def decode(self, parts: Sequence[Part]) -> list[int]:
        """One llama_decode of every part's tokens; for each part that wants an output, the
        batch row to sample from (-1 for the others)."""
        batch, n = self._batch, 0
        rows: list[int] = []
        for part in parts:
            for i, token in enumerate(part.tokens):
                batch.token[n] = token
                batch.pos[n] = part.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = part.seq
                batch.logits[n] = 0
                n += 1
            if part.output:
                batch.logits[n - 1] = 1
            rows.append(n - 1 if part.output else -1)
        batch.n_tokens = n
        if (code := llama_cpp.llama_decode(self._ctx.ctx, batch)) != 0:
            raise EngineError(f"llama_decode failed with code {code} on a batch of {n} tokens")
        return rows

    def sampler(self, sampling: Sampling) -> Sampler:
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        return Sampler(self._n_vocab, sampling, seed)

    def sample(self, sampler: Sampler, row: int) -> int:
        """A token from the logits of a decode()d row; the sampler remembers it (penalties)."""
        token: int = llama_cpp.llama_sampler_sample(sampler._chain, self._ctx.ctx, row)
        return token

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- the KV cache's sequences (kvstates.py) -------------------------------------------

    def seq_drop(self, seq: int, start: int = 0) -> bool:
        """Forget sequence `seq` from position `start` on; False if the model cannot cut its
        state there (recurrent models): then the whole sequence is gone."""
        if llama_cpp.llama_memory_seq_rm(self._memory, seq, start, -1):
            return True
        llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
        return False

    def seq_copy(self, source: int, target: int, n: int) -> None:
        """Sequence `target` also holds `source`'s first n positions (the cells are shared)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, n)

    def seq_save(self, seq: int) -> bytearray:
        """Sequence `seq`'s KV cache, to seq_load() later, into any sequence."""
        ctx = self._ctx.ctx
        data = bytearray(llama_cpp.llama_state_seq_get_size(ctx, seq))
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)  # written in place: one copy
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, len(data), seq)
        del buf  # a view of data: it must go before data may be resized
        del data[n:]
        return data

    def seq_load(self, seq: int, data: bytearray) -> bool:
        """Put a seq_save() into the (empty) sequence `seq`; False if llama.cpp refused it
        (no room in the pool, another model): the sequence is then empty."""
        src = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, src, len(data), seq) == len(data):
            return True
        llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
        return False

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = self._piece_buf  # reused: this runs once per generated token
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # the buffer was too small; -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    # -- description -----------------------------------------------------------------------

    def _model_info(self) -> ModelInfo:
        meta = self._metadata
        model = self._model.model
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, buf, len(buf))
        # "qwen2 1B Q4_K - Medium": architecture, size class, then the quantization.
        desc = buf.value.decode(errors="replace").split(" ", 2)
        return ModelInfo(
            name=meta.get("general.name", self.path.stem),
            path=str(self.path),
            architecture=meta.get("general.architecture", desc[0]),
            quantization=desc[2] if len(desc) == 3 else "",
            parameter_count=llama_cpp.llama_model_n_params(model),
            size_bytes=self.path.stat().st_size,
            trained_context_length=llama_cpp.llama_model_n_ctx_train(model),
            has_chat_template=self._formatter is not None,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            self._ctx.close()  # the context before its model
            self._model.close()


def read_shape(path: Path) -> ModelShape:
    """The model's dimensions from its GGUF metadata (a vocabulary-only load: no weights)."""
    backend.load(model=path)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        # The model alone, without a context (Llama(vocab_only=True) makes one, and logs it).
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError.of(path, e) from None
    meta = model.metadata()
    arch = meta.get("general.architecture", "")

    def number(key: str, default: int = 0) -> int:
        try:
            return int(meta.get(f"{arch}.{key}", default))
        except ValueError:
            return default

    n_embd, n_head = number("embedding_length"), max(1, number("attention.head_count", 1))
    shape = ModelShape(
        weights_bytes=path.stat().st_size,
        n_layer=number("block_count"),
        n_head_kv=number("attention.head_count_kv", n_head),
        key_length=number("attention.key_length", n_embd // n_head),
        value_length=number("attention.value_length", n_embd // n_head),
        n_vocab=model.n_vocab(),
        n_embd=n_embd,
        trained_context=number("context_length"),
    )
    model.close()
    return shape


def system_info() -> str:
    info: bytes = llama_cpp.llama_print_system_info()
    return info.decode(errors="replace").strip()


def cpu_features_used(info: str) -> tuple[str, ...]:
    """'CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | ...' -> ('SSE3', 'AVX')."""
    features = []
    for part in info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1":
            features.append(name)
    return tuple(features)
