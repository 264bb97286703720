"""Conversations: a Generate call in a session, from the stored history to the stored turn.

claim() marks the session busy and only then reads it, so a turn always sees the turns
before it; fit() puts the history in front of the new message (dropping the oldest turns
when the conversation no longer fits, or refusing, as configured); finish() stores the turn,
unless the call was cancelled, before the answer's last message goes out, and frees the
session; release() frees it in every other case (a cancel frees it at once, from the call's
end callback). One answer at a time per session: a second Generate while one runs is refused
(FAILED_PRECONDITION) rather than queued, since its history would not include the first
answer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from edge_llm.sessions import SessionStore
from edge_llm.types import (
    BusyError,
    ChatMessage,
    GenerateRequest,
    NotFoundError,
    PreconditionError,
    RequestError,
    SamplingDefaults,
    Session,
    SessionChanges,
)

Tokenize = Callable[[None, Sequence[ChatMessage]], list[int]]
EXPIRE_EVERY = 3600.0  # seconds between removals of idle sessions while the server is used


@dataclass(frozen=True)
class Claim:
    """A session, read while busy for one call: only this claim may store a turn in it."""

    session: Session
    token: int


@dataclass(frozen=True)
class Turn:
    claim: Claim
    user: ChatMessage
    request: GenerateRequest  # with the whole conversation in messages
    prompt: list[int]
    dropped: int  # oldest messages left out so that it fits
    notice: str  # says so, for the answer's last message
    replace_last: bool = False  # stored in place of the last turn (regenerate, edit)


class Conversations:
    def __init__(
        self,
        store: SessionStore,
        context_length: int,
        drop_oldest: bool,
        tokenize: Tokenize,
        has_chat_template: bool,
        forget: Callable[[str], None],
    ) -> None:
        self.store = store
        self.context_length = context_length
        self.drop_oldest = drop_oldest  # else refuse a conversation that no longer fits
        self._tokenize = tokenize
        self._has_chat_template = has_chat_template
        self._forget = forget  # drops a removed session's KV cache
        self._busy: dict[str, int] = {}  # session id -> the claim's token
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._expired_at = time.monotonic()

    def create(
        self, system_prompt: str, defaults: SamplingDefaults, title: str = "", owner: str = ""
    ) -> Session:
        if not self._has_chat_template:
            raise PreconditionError(
                "sessions need a chat template, and this model has none; send raw prompts"
            )
        self._check_system_prompt(system_prompt)
        with self._lock:
            busy = set(self._busy)
        session, removed = self.store.create(
            system_prompt, defaults, keep=busy, title=title, owner=owner
        )
        self._forget_all(removed)
        return session

    def update(self, session_id: str, changes: SessionChanges, owner: str) -> Session:
        """Rename, or change the system prompt or defaults: the next turn uses them."""
        if changes.system_prompt is not None:
            self._check_system_prompt(changes.system_prompt)
        return self.store.update(session_id, changes, owner)

    def _check_system_prompt(self, system_prompt: str) -> None:
        if system_prompt:
            tokens = len(self._tokenize(None, [ChatMessage("system", system_prompt)]))
            if tokens > self.context_length // 2:
                raise RequestError(
                    f"system_prompt is {tokens} tokens; at most half the {self.context_length}"
                    "-token context may go to it, the rest is for the conversation"
                )

    def delete(self, session_id: str, owner: str) -> None:
        self.store.delete(session_id, owner)
        self._forget(session_id)

    def claim(self, session_id: str, owner: str) -> Claim:
        """The session, `owner`'s, to add a turn to: busy until released."""
        # Another's session is not found, before it could be found busy (or marked busy).
        if not self.store.owns(session_id, owner):
            raise NotFoundError(f"no session {session_id!r}; create one with CreateSession")
        with self._lock:
            if session_id in self._busy:
                raise BusyError(
                    f"session {session_id} is still answering a message; wait for that answer "
                    "(or cancel it) before sending the next"
                )
            claim_token = next(self._tokens)
            self._busy[session_id] = claim_token
        try:
            session = self.store.get(session_id, owner)
        except BaseException:
            self._release(session_id, claim_token)
            raise
        self._maybe_expire()
        return Claim(session, claim_token)

    def finish(self, turn: Turn, answer: str, cancelled: Callable[[], bool]) -> bool:
        """Store the turn and free the session, unless the call was cancelled (or the claim
        was released); the caller then sends the answer's last message. False: not stored."""
        session_id = turn.claim.session.id
        with self._lock:
            if self._busy.get(session_id) != turn.claim.token or cancelled():
                return False
            # Under the lock: a cancel arriving now waits, and finds the session free.
            self.store.commit_turn(
                session_id,
                turn.user,
                ChatMessage("assistant", answer),
                turn.dropped,
                turn.replace_last,
            )
            del self._busy[session_id]
        return True

    def release(self, claim: Claim) -> None:
        self._release(claim.session.id, claim.token)

    def release_soon(self, claim: Claim) -> None:
        """release() without waiting: for gRPC's RPC-done callbacks, which run on its one
        polling thread. If a turn is being committed (an fsync, slow on an SD card), the
        release happens on a thread of its own once the commit is done."""
        if not self._lock.acquire(blocking=False):
            threading.Thread(
                target=self.release, args=(claim,), name="release-session", daemon=True
            ).start()
            return
        try:
            self._free(claim.session.id, claim.token)
        finally:
            self._lock.release()

    def _release(self, session_id: str, claim_token: int) -> None:
        with self._lock:
            self._free(session_id, claim_token)

    def _free(self, session_id: str, claim_token: int) -> None:
        """Under the lock: the session is no longer busy, if this claim still holds it."""
        if self._busy.get(session_id) == claim_token:
            del self._busy[session_id]

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._expired_at < EXPIRE_EVERY:
            return
        self._expired_at = now
        with self._lock:
            busy = set(self._busy)
        self._forget_all(self.store.expire(keep=busy))

    def _forget_all(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            self._forget(session_id)

    def fit(self, claim: Claim, request: GenerateRequest, replace_last: bool = False) -> Turn:
        """The conversation as the model will see it, with room for the answer: max_tokens, or
        a quarter of the context if that is less (a longer answer may then stop at the end
        of the context, as it would without a session). To replace the last turn (regenerate
        an answer, or edit the last question), the history leaves that turn out.

        When turns must go, enough go that the conversation takes at most half the context,
        if it can: the next turns then find their start unchanged, and their KV cache.
        """
        session = claim.session
        (user,) = request.messages
        history = session.messages
        if replace_last:
            if not history:
                raise RequestError("replace_last: this session has no turn to replace yet")
            history = history[:-2]  # a turn is a user message and its answer
        n_ctx = self.context_length
        room = min(request.max_tokens, n_ctx // 4)

        def prompt_without(drop: int) -> list[int]:
            kept = replace(session, messages=history[drop:])
            return self._tokenize(None, kept.conversation(user))

        drop, prompt = 0, prompt_without(0)
        if len(prompt) + room > n_ctx:
            alone = prompt_without(len(history))  # the system prompt and the new message
            if len(alone) + room > n_ctx:
                raise RequestError(
                    f"the system prompt and this message are {len(alone)} tokens; with {room} "
                    f"tokens of room for the answer they do not fit the {n_ctx}-token context: "
                    "shorten the message"
                )
            if not self.drop_oldest:
                raise RequestError(
                    f"the conversation is {len(prompt)} tokens; with {room} tokens of room for "
                    f"the answer it no longer fits the {n_ctx}-token context: start a new "
                    "session"
                )
            target = n_ctx // 2 if len(alone) <= n_ctx // 2 else n_ctx - room
            while len(prompt) + room > n_ctx or len(prompt) > target:
                drop += 2  # a user message and its answer
                prompt = alone if drop >= len(history) else prompt_without(drop)
            drop = min(drop, len(history))
        notice = (
            f"the conversation no longer fitted the {n_ctx}-token context: its {drop} oldest "
            "messages were dropped (the system prompt is kept)"
            if drop
            else ""
        )
        messages = replace(session, messages=history[drop:]).conversation(user)
        full = replace(request, messages=messages, session_id=session.id)
        return Turn(claim, user, full, prompt, drop, notice, replace_last)
