"""Requests that outlive their engine replica: what the router may send again when a replica fails mid-answer.

A stream of a generate route (chat, completions; one choice) continues on another replica: the router asks the
engine for token ids (vLLM's `return_token_ids`), relays the events with those ids replaced by the `null` the
client would have got, and keeps only the ids. When the replica fails (reset, early end, an engine error event,
5xx), the same request goes to another replica with the prompt's ids plus the generated ones as its prompt
(completions: `prompt`; chat: vLLM's `kv_transfer_params.prompt_token_ids`, which skips templating) and
`max_tokens` lowered by their number; its events are rewritten to continue the client's stream (same id and
`created`, no second role chunk, usage counting the client's prompt and every completion token). Nothing is
parsed per chunk unless a request was continued.

A non-streaming generate request is sent again from the start (the client has seen nothing; greedy and seeded
answers are the same), idempotent routes of other tasks once. Anything else is never sent twice.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.errors import engine_failed

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RETRIED_ONCE = {"/v1/embeddings", "/pooling", "/classify", "/v1/classify", "/score", "/v1/score", "/rerank",
                "/v1/rerank", "/v2/rerank", "/tokenize", "/detokenize"}
WAIT_S = 15.0  # how long a request to continue waits for a replica with a free slot before it fails
# Settings whose state a continuation could not carry over (a grammar, an echo, several choices).
NOT_CONTINUABLE = ("echo", "kv_transfer_params", "use_beam_search", "structured_outputs", "guided_json",
                   "guided_regex", "guided_choice", "guided_grammar")
TOKEN_IDS = re.compile(rb'"token_ids":\[([\d,]*)\]')  # not "prompt_token_ids": the quote comes first
PROMPT_IDS = re.compile(rb'"prompt_token_ids":\[([\d,]*)\]')
ERROR_EVENT = b'data: {"error"'
DONE = b"data: [DONE]\n\n"


def attempts(route: str, migration_limit: int) -> int:
    """How many more times this request may be sent to another replica after a failure."""
    if route in (CHAT, COMPLETIONS):
        return migration_limit
    return min(1, migration_limit) if route in RETRIED_ONCE else 0


def continuable(route: str, payload: dict[str, Any]) -> bool:
    """A stream with one choice and nothing a continuation would lose."""
    if route not in (CHAT, COMPLETIONS) or payload.get("stream") is not True:
        return False
    if payload.get("n") not in (None, 1) or payload.get("best_of") not in (None, 1):
        return False
    if any(payload.get(k) for k in NOT_CONTINUABLE):
        return False
    if route == COMPLETIONS:
        prompt = payload.get("prompt")
        return isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt))
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return False
    # vLLM renders non-text content itself, ignoring forwarded prompt ids.
    contents = [m.get("content") if isinstance(m, dict) else None for m in payload.get("messages") or []]
    return all(not isinstance(c, list) or all(isinstance(p, dict) and p.get("type") == "text" for p in c)
               for c in contents)


class Continuation:
    """One stream as relayed to its client: what a continuation on another replica needs, and its rewriting."""

    def __init__(self, route: str, payload: dict[str, Any]):
        self.chat, self.payload = route == CHAT, payload
        self.strip = payload.get("return_token_ids") is not True  # the ids are the router's, not the client's
        self.prompt_ids: list[int] | None = None
        self.id_chunks: list[bytes] = []  # generated ids as relayed ("1,2,3"), parsed only to continue
        self.ids: list[int] = []  # generated ids parsed so far (continued streams)
        self.pending = b""  # the start of an event not yet complete
        self.head: bytes | None = None  # the first event relayed (its id, created, model)
        self.last = b""  # the events relayed last
        self.finished = self.done = False  # a finish_reason / [DONE] relayed
        self.base = 0  # generated tokens carried into the current continuation
        self.text_offset = 0  # completions logprobs: characters relayed before the current continuation
        self.continued = False
        self.carried: list[int] = []  # the prompt ids the current continuation was sent

    def engine_body(self, body: bytes) -> bytes:
        """The client's body asking for token ids too (the last key wins over the client's own)."""
        return body[:body.rindex(b"}")] + b',"return_token_ids":true}' if self.strip else body

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """(the complete events of the engine's bytes so far to relay, whether the engine reported a failure)."""
        data = self.pending + chunk
        cut = data.rfind(b"\n\n") + 2
        if cut == 1:
            self.pending = data
            return b"", False
        events, self.pending = data[:cut], data[cut:]
        failed = False
        error = events.find(ERROR_EVENT)
        if error >= 0 and engine_error(events[error:]):
            events, failed = events[:error], True
        events = self._rewrite(events) if self.continued else self._strip(events)
        if events:
            if self.head is None:
                self.head = events[:events.find(b"\n\n")]
            self.last = events
            self.finished = self.finished or b'"finish_reason":"' in events
            self.done = events.endswith(DONE)
        return events, failed

    def _strip(self, events: bytes) -> bytes:
        """The events with the router's token ids replaced by null (regex split and join: no Python per event)."""
        if self.prompt_ids is None and (found := PROMPT_IDS.search(events)):
            self.prompt_ids = json.loads(b"[" + found[1] + b"]")
            if self.strip:
                events = events[:found.start()] + b'"prompt_token_ids":null' + events[found.end():]
        parts = TOKEN_IDS.split(events)
        if len(parts) == 1:
            return events
        self.id_chunks += parts[1::2]
        return b'"token_ids":null'.join(parts[::2]) if self.strip else events

    def generated(self) -> list[int]:
        if self.id_chunks:
            self.ids += json.loads(b"[" + b",".join(filter(None, self.id_chunks)) + b"]")
            self.id_chunks.clear()
        return self.ids

    def tail(self, include_usage: bool) -> bytes:
        """What ends a stream whose last token was relayed but not its end (usage, [DONE])."""
        if not include_usage or b'"usage":{' in self.last:
            return DONE
        head = json.loads(self.head[6:])
        prompt, completion = len(self.prompt_ids or ()), len(self.generated())
        usage = {"id": head["id"], "object": head["object"], "created": head["created"], "model": head["model"],
                 "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}}
        return event(usage) + DONE

    def continuation(self) -> bytes | None:
        """The request that continues this stream on another replica (None: it cannot be continued)."""
        if self.prompt_ids is None or self.head is None:
            return None
        ids = self.generated()
        if not self.continued:
            self._first_offsets()
        self.continued, self.base = True, len(ids)
        body = {**self.payload, "stream": True, "return_token_ids": True}
        self.carried = self.prompt_ids + ids
        if self.chat:
            body["kv_transfer_params"] = {"prompt_token_ids": self.carried}
        else:
            body["prompt"] = self.carried
        for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if type(body.get(key)) is int:
                body[key] = max(body[key] - len(ids), 0 if key == "min_tokens" else 1)
        body.pop("prompt_logprobs", None)
        return json.dumps(body).encode()

    def _first_offsets(self) -> None:
        """id, created and the relayed text's length (completions logprobs' text_offset) before continuing."""
        head = json.loads(self.head[6:])
        self.id, self.created = head["id"], head["created"]
        if self.chat:
            return
        for line in reversed(self.last.split(b"\n\n")):
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:]).get("choices") or []:
                    logprobs = choice.get("logprobs") or {}
                    if logprobs.get("text_offset"):
                        self.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                        return

    def _rewrite(self, events: bytes) -> bytes:
        out = []
        for line in events.split(b"\n\n"):
            if not line.startswith(b"data: {"):
                out.append(line + b"\n\n" if line else b"")
                continue
            chunk = json.loads(line[6:])
            chunk["id"], chunk["created"] = self.id, self.created
            if chunk.get("prompt_token_ids") is not None:
                self._check(chunk["prompt_token_ids"])
                chunk["prompt_token_ids"] = None
            if chunk.get("usage"):
                chunk["usage"] = self._usage(chunk["usage"])
            choices = chunk.get("choices") or []
            if self.chat and any("role" in (c.get("delta") or {}) for c in choices):
                continue  # the client has its role chunk
            for choice in choices:
                self.ids += choice.get("token_ids") or []
                if self.strip and "token_ids" in choice:
                    choice["token_ids"] = None
                if choice.get("prompt_token_ids") is not None:
                    self._check(choice["prompt_token_ids"])
                    choice["prompt_token_ids"] = None
                offsets = (choice.get("logprobs") or {}).get("text_offset") if not self.chat else None
                if offsets:
                    choice["logprobs"]["text_offset"] = [o + self.text_offset for o in offsets]
            out.append(event(chunk))
        return b"".join(out)

    def _check(self, prompt_ids: list[int]) -> None:
        """The continuation's prompt as its engine read it must be the one carried over: an engine that ignores
        `kv_transfer_params.prompt_token_ids` (older vLLM, e.g. 0.26) would start the answer again."""
        if prompt_ids != self.carried:
            raise engine_failed("The replica serving this stream failed, and the replica it moved to cannot continue "
                                "a chat from token ids (its vLLM ignores kv_transfer_params.prompt_token_ids).")

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = len(self.prompt_ids or ()), self.base + usage.get("completion_tokens", 0)
        return {**usage, "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engine_error(events: bytes) -> bool:
    """Whether an error event is the engine's own failure (5xx), not a refusal of the request."""
    line = events[6:events.find(b"\n\n")] if b"\n\n" in events else events[6:]
    try:
        code = json.loads(line)["error"].get("code")
    except (ValueError, KeyError, AttributeError):
        return True
    return not isinstance(code, int) or code >= 500


def event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
