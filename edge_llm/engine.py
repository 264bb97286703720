"""The model: load a GGUF file with llama-cpp-python and turn token ids into text.

This is the only module that imports llama_cpp. An Engine is driven by one thread at a time
(the scheduler's worker); tokenizing is safe from any thread, as it only reads the vocabulary.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_llm import backend
from edge_llm.memory import ModelShape
from edge_llm.textstream import TextStream
from edge_llm.types import (
    ChatMessage,
    FinishReason,
    GenerateRequest,
    GenerationStats,
    ModelInfo,
    RequestError,
)

log = logging.getLogger(__name__)

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
    context_length: int
    batch_size: int
    threads: int
    threads_batch: int


class Engine:
    def __init__(self, path: Path, settings: EngineSettings) -> None:
        self.path = path
        self.settings = settings
        backend.load(model=path)  # no-op when the server already loaded its choice
        try:
            # The library prints its own load log through stderr; keep it for debug level only.
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=settings.context_length,
                n_batch=settings.batch_size,
                n_ubatch=settings.batch_size,
                n_threads=settings.threads,
                n_threads_batch=settings.threads_batch,
                use_mmap=True,
                verbose=log.isEnabledFor(logging.DEBUG),
            )
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError.of(path, e) from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._piece_buf = ctypes.create_string_buffer(64)
        # Recurrent and hybrid models keep a state that cannot be cut back to a prefix.
        model = self._llm.model
        self._prefix_reusable = not (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        self._formatter = self._chat_formatter()
        self.info = self._model_info()

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
            return self._llm.tokenize(prompt.encode(), add_bos=True, special=True)
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
                tokens += self._llm.tokenize(
                    messages[int(piece)].content.encode(), add_bos=False, special=False
                )
            elif piece:
                tokens += self._llm.tokenize(piece.encode(), add_bos=False, special=True)
        return tokens

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None

        def text_of(token: int) -> str:
            return self._piece(token, special=True).decode(errors="replace") if token >= 0 else ""

        return Jinja2ChatFormatter(
            template=template,
            eos_token=text_of(self._llm.token_eos()),
            bos_token=text_of(self._llm.token_bos()),
            add_generation_prompt=True,
        )

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompt: list[int],
        request: GenerateRequest,
        cancelled: Callable[[], bool],
        stats: GenerationStats,
    ) -> Iterator[str]:
        """Yield text deltas for a prompt from prompt_tokens().

        `cancelled` is polled between prompt batches and between tokens.

        Ends with stats.finish_reason set, unless cancelled (then it is None).
        """
        llm, s = self._llm, request.sampling
        stats.prompt_tokens = len(prompt)
        max_tokens = min(request.max_tokens, self.settings.context_length - len(prompt))

        # Keep the KV cache of the longest prefix shared with the previous request (a system
        # prompt, an earlier turn), then process the rest one batch at a time, so that a
        # cancelled request stops at the next batch boundary. At least the last prompt token is
        # processed again: its logits are what the first answer token is sampled from.
        reused = min(_common_prefix(llm.input_ids[: llm.n_tokens], prompt), len(prompt) - 1)
        if not self._prefix_reusable:
            reused = 0
            llm.reset()
        llm.n_tokens = reused  # eval() drops the KV cells past n_tokens
        stats.prompt_tokens_reused = reused
        for start in range(reused, len(prompt), self.settings.batch_size):
            if cancelled():
                return
            batch = prompt[start : start + self.settings.batch_size]
            llm.eval(batch)
            stats.prompt_tokens_processed += len(batch)

        # generate() finds the whole prompt in the cache with fresh logits and samples at once.
        llm.set_seed(s.seed if s.seed is not None else random.getrandbits(32))
        tokens = llm.generate(
            prompt,
            temp=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repeat_penalty=s.repeat_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
        )
        text = TextStream(request.stop)
        try:
            for token in tokens:
                now = time.monotonic()
                stats.first_token_at = stats.first_token_at or now
                stats.last_token_at = now
                if llama_cpp.llama_vocab_is_eog(self._vocab, token) and not request.ignore_eos:
                    stats.finish_reason = FinishReason.STOP
                    break
                stats.completion_tokens += 1
                if delta := text.push(self._piece(token)):
                    yield delta
                if text.stopped:
                    stats.finish_reason = FinishReason.STOP
                    return
                if stats.completion_tokens >= max_tokens:
                    stats.finish_reason = FinishReason.LENGTH
                    break
                if cancelled():
                    return
        finally:
            tokens.close()
        if tail := text.finish():
            yield tail

    # -- the KV cache, for sessions (kvstates.py) -------------------------------------------

    def kv_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the context now."""
        tokens: list[int] = self._llm.input_ids[: self._llm.n_tokens].tolist()
        return tokens

    @property
    def kv_restorable(self) -> bool:
        """Recurrent and hybrid models keep no per-token cache to save and cut back."""
        return self._prefix_reusable

    def save_kv(self) -> bytearray:
        """The KV cache of the context's one sequence, to load_kv() later."""
        ctx = self._llm.ctx
        data = bytearray(llama_cpp.llama_state_seq_get_size(ctx, 0))
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)  # written in place: one copy
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, len(data), 0)
        del buf  # a view of data: it must go before data may be resized
        del data[n:]
        return data

    def load_kv(self, tokens: list[int], data: bytearray) -> bool:
        """Put back a save_kv() taken when kv_tokens() was `tokens`; False if llama.cpp
        refused it (the cache is then empty: the next prompt is processed whole)."""
        llm = self._llm
        llm.n_tokens = 0
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        if not self._prefix_reusable or len(tokens) > self.settings.context_length:
            return False
        src = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if llama_cpp.llama_state_seq_set_data(llm.ctx, src, len(data), 0) != len(data):
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            return False
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        return True

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = self._piece_buf  # reused: this runs once per generated token
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # the buffer was too small; -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    # -- description -----------------------------------------------------------------------

    def _model_info(self) -> ModelInfo:
        meta = self._llm.metadata
        model = self._llm.model
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
            self._llm.close()


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


def _common_prefix(a: Iterable[int], b: Iterable[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
