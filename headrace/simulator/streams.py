"""Streamed answers: the server-sent events of each dialect, built from the answer's complete body.

Both dialects stream the body the same call answers unstreamed, so that streamed and unstreamed
replies of one seeded request carry the same content, tool calls, finish reason and usage:

- OpenAI Chat Completions: ``data: {chat.completion.chunk}`` lines; a first chunk with the role,
  one chunk per word of the content (or per piece of a tool call's arguments), a chunk with the
  finish_reason, with ``stream_options.include_usage`` a last chunk with ``choices: []`` and the
  usage (every chunk then carries ``usage: null``), and ``data: [DONE]``.
- Anthropic Messages: ``event: message_start`` (usage.input_tokens), per content block a
  ``content_block_start``, ``content_block_delta`` events (text_delta; input_json_delta for a
  tool_use block; thinking_delta then one signature_delta for a thinking block) and a
  ``content_block_stop``, then ``message_delta`` (stop_reason and
  usage.output_tokens) and ``message_stop``. One ``ping`` follows the first block's start.

Pacing (``headrace.simulator.calls``): a "send" is the events written at once. The first send,
which carries the first piece of output, leaves after ``first_chunk_share`` of the call's latency;
the rest of the latency is spread evenly between the other sends, one per piece of output, the
events around the pieces (block boundaries, finish, usage) riding with their neighbours.
"""

from __future__ import annotations

import json
from typing import Any


def openai_sends(body: dict[str, Any], *, include_usage: bool) -> list[str]:
    """The sends of a streamed chat.completion ``body``."""
    choice = body["choices"][0]
    message = choice["message"]
    head: dict[str, Any] = {key: body[key] for key in ("id", "created", "model") if key in body}
    head["object"] = "chat.completion.chunk"
    for key in ("service_tier", "system_fingerprint"):
        if key in body:
            head[key] = body[key]

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        one: dict[str, Any] = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            one["usage"] = None
        return _data(one)

    events: list[tuple[str, bool]] = []  # (event, carries output)
    tool_calls = message.get("tool_calls") or []
    if tool_calls:
        starts = [
            {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            for index, call in enumerate(tool_calls)
        ]
        events.append((chunk({"role": "assistant", "content": None, "tool_calls": starts}), False))
        for index, call in enumerate(tool_calls):
            for piece in pieces(call["function"]["arguments"]):
                delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                events.append((chunk(delta), True))
    else:
        events.append((chunk({"role": "assistant", "content": "", "refusal": None}), False))
        events.extend((chunk({"content": piece}), True) for piece in pieces(message.get("content") or ""))
    events.append((chunk({}, choice["finish_reason"]), False))
    if include_usage:
        events.append((_data({**head, "choices": [], "usage": body["usage"]}), False))
    events.append(("data: [DONE]\n\n", False))
    return group(events)


def anthropic_sends(body: dict[str, Any]) -> list[str]:
    """The sends of a streamed Message ``body``."""
    usage = body["usage"]
    start = {
        **body,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # As the real API: input counted at the start, output so far (one token) until the end.
        "usage": {**usage, "output_tokens": 1},
    }
    events: list[tuple[str, bool]] = [(_event("message_start", {"message": start}), False)]
    for index, block in enumerate(body["content"]):
        if block["type"] == "tool_use":
            opened = {**block, "input": {}}
            arguments = pieces(json.dumps(block["input"]))
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in arguments]
        elif block["type"] == "thinking":  # its text in pieces, then its signature
            opened = {**block, "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:
            opened = {**block, "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in pieces(block.get("text") or "")]
        events.append((_event("content_block_start", {"index": index, "content_block": opened}), False))
        if index == 0:
            events.append((_event("ping", {}), False))
        events.extend((_event("content_block_delta", {"index": index, "delta": d}), True) for d in deltas)
        events.append((_event("content_block_stop", {"index": index}), False))
    end = {"stop_reason": body["stop_reason"], "stop_sequence": body["stop_sequence"]}
    output = {"output_tokens": usage["output_tokens"]}
    events.append((_event("message_delta", {"delta": end, "usage": output}), False))
    events.append((_event("message_stop", {}), False))
    return group(events)


def pieces(text: str) -> list[str]:
    """``text`` cut before each space: one piece per word (a simulated token), joined back exactly."""
    words = text.split(" ")
    cut = [words[0], *(" " + word for word in words[1:])]
    return [piece for piece in cut if piece]


def group(events: list[tuple[str, bool]]) -> list[str]:
    """Sends: each ends with a piece of output, what follows the last piece joins the last send."""
    sends: list[str] = []
    pending: list[str] = []
    for event, output in events:
        pending.append(event)
        if output:
            sends.append("".join(pending))
            pending = []
    if pending:
        if sends:
            sends[-1] += "".join(pending)
        else:
            sends.append("".join(pending))
    return sends


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"
