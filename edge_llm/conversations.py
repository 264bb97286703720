"""Conversations: a Generate call in a session, from the stored history to the stored turn.

start() puts the session's history in front of the new message (dropping the oldest turns
when the conversation no longer fits, or refusing, as configured) and marks the session
busy; finish() stores the turn before the answer's last message goes out; release() frees
the session whatever happened. One answer at a time per session: a second Generate while
one runs is refused (FAILED_PRECONDITION) rather than queued, since its history would not
include the first answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from edge_llm.sessions import SessionStore
from edge_llm.types import (
    BusyError,
    ChatMessage,
    GenerateRequest,
    RequestError,
    SamplingDefaults,
    Session,
)

Tokenize = Callable[[None, Sequence[ChatMessage]], list[int]]


@dataclass(frozen=True)
class Turn:
    session: Session
    user: ChatMessage
    request: GenerateRequest  # with the whole conversation in messages
    prompt: list[int]
    dropped: int  # oldest messages left out so that it fits
    notice: str  # says so, for the answer's last message


class Conversations:
    def __init__(
        self,
        store: SessionStore,
        context_length: int,
        drop_oldest: bool,
        forget: Callable[[str], None],
    ) -> None:
        self.store = store
        self.context_length = context_length
        self.drop_oldest = drop_oldest  # else refuse a conversation that no longer fits
        self._forget = forget  # drops a removed session's KV cache
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def create(self, system_prompt: str, defaults: SamplingDefaults) -> Session:
        session, removed = self.store.create(system_prompt, defaults)
        for session_id in removed:
            self._forget(session_id)
        return session

    def delete(self, session_id: str) -> None:
        self.store.delete(session_id)
        self._forget(session_id)

    def start(self, session: Session, request: GenerateRequest, tokenize: Tokenize) -> Turn:
        with self._lock:
            if session.id in self._busy:
                raise BusyError(
                    f"session {session.id} is still answering a message; wait for that answer "
                    "(or cancel it) before sending the next"
                )
            self._busy.add(session.id)
        try:
            return self._fit(session, request, tokenize)
        except BaseException:
            self.release(session.id)
            raise

    def finish(self, turn: Turn, answer: str) -> None:
        """Store the turn (the caller then sends the answer's last message)."""
        self.store.commit_turn(
            turn.session.id, turn.user, ChatMessage("assistant", answer), turn.dropped
        )

    def release(self, session_id: str) -> None:
        with self._lock:
            self._busy.discard(session_id)

    def _fit(self, session: Session, request: GenerateRequest, tokenize: Tokenize) -> Turn:
        """The conversation as the model will see it, with room for the answer: max_tokens, or
        a quarter of the context if that is less (a longer answer may then stop at the end
        of the context, as it would without a session).

        When turns must go, enough go that the conversation takes at most half the context:
        the next turns then find their start unchanged, and the KV cache stays reusable.
        """
        (user,) = request.messages
        history = session.messages
        n_ctx = self.context_length
        room = min(request.max_tokens, n_ctx // 4)
        drop = 0
        prompt = tokenize(None, session.conversation(user))
        while len(prompt) + room > n_ctx or (drop and len(prompt) > n_ctx // 2):
            if len(prompt) + room > n_ctx and not self.drop_oldest:
                raise RequestError(
                    f"the conversation is {len(prompt)} tokens; with {room} tokens of room for "
                    f"the answer it no longer fits the {n_ctx}-token context: start a new "
                    "session"
                )
            if drop >= len(history):
                if len(prompt) + room <= n_ctx:
                    break
                raise RequestError(
                    f"the system prompt and this message are {len(prompt)} tokens; with {room} "
                    f"tokens of room for the answer they do not fit the {n_ctx}-token context: "
                    "shorten them"
                )
            drop += 2  # a user message and its answer
            kept = replace(session, messages=history[drop:])
            prompt = tokenize(None, kept.conversation(user))
        notice = (
            f"the conversation no longer fitted the {n_ctx}-token context: its {drop} oldest "
            "messages were dropped (the system prompt is kept)"
            if drop
            else ""
        )
        messages = replace(session, messages=history[drop:]).conversation(user)
        full = replace(request, messages=messages, session_id=session.id)
        return Turn(session, user, full, prompt, drop, notice)
