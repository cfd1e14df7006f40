"""Anthropic Message Batches wire <-> canonical Chat Completions, checked against both SDKs' types."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any, get_args

import pytest
from anthropic.types import Message, message_create_params
from anthropic.types.messages import MessageBatchIndividualResponse
from anthropic.types.shared import ErrorType
from openai.types.chat import completion_create_params
from pydantic import TypeAdapter, ValidationError

from api.compat.anthropic_message import chat_to_message, error_result
from api.compat.anthropic_wire import WireError, messages_params_to_chat
from workers.providers.anthropic_parts import without_anthropic_parts
from workers.providers.anthropic_translate import chat_to_messages, message_to_chat

_ANTHROPIC_PARAMS = TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)
_CHAT_PARAMS = TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
# In the HTTP API but, since anthropic 1.0, absent from the SDK's typed params (sent via extra_body).
_UNTYPED_KEYS = ("temperature", "top_p", "top_k")

MODEL = "claude-route"
PNG_DATA = "iVBORw0KGgo="
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city", "input_schema": SCHEMA}
CHAT_WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city", "parameters": SCHEMA},
}


def _materialize(value: Any) -> Any:
    # Pydantic validates Iterable[...] fields lazily; walking them runs the validation.
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_materialize(v) for v in value]
    return value


def params(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """Batch request params, checked to fit anthropic's MessageCreateParamsNonStreaming."""
    body = {"model": MODEL, "max_tokens": 100, "messages": messages or [_user("Hi")], **fields}
    typed = {k: v for k, v in body.items() if k not in _UNTYPED_KEYS}
    # Validation drops keys a TypedDict doesn't declare, so equality means none were unknown.
    assert _materialize(_ANTHROPIC_PARAMS.validate_python(typed)) == typed
    return body


def translate(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """messages_params_to_chat on valid params; the result must fit openai's Chat params exactly, once
    the Anthropic-only parts an OpenAI deployment is never sent are left out."""
    out = messages_params_to_chat(params(messages, **fields))
    assert_valid_chat_body(dict(without_anthropic_parts(out)))
    return out


def assert_valid_chat_body(body: dict[str, Any]) -> None:
    assert _materialize(_CHAT_PARAMS.validate_python(body)) == body


def wire_error(raw: dict[str, Any]) -> str:
    """The WireError message for raw (possibly invalid) params."""
    with pytest.raises(WireError) as info:
        messages_params_to_chat(raw)
    return str(info.value)


def raw_params(messages: Any = None, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 100, "messages": messages or [_user("Hi")], **fields}


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _text(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": text, **extra}


def _image_b64(media_type: str = "image/png", data: str = PNG_DATA) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _tool_result(call_id: str, content: Any = "18C", **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": content, **extra}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# messages_params_to_chat: the envelope


def test_minimal_params_become_a_minimal_chat_body() -> None:
    """model (a Headrace route) and max_tokens pass through unchanged next to the user's message."""
    assert translate() == {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}


def test_input_params_are_not_mutated_nor_aliased() -> None:
    """Translation is pure: params stay as they were, and the stored body shares no objects with them."""
    body = params(
        [
            _user("a"),
            _assistant([_tool_use("t1", "get_weather", {"city": "Paris"})]),
            _user([_tool_result("t1")]),
        ],
        system=[_text("s", cache_control={"type": "ephemeral"})],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    before = copy.deepcopy(body)
    out = messages_params_to_chat(body)
    assert body == before
    out["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] = "number"
    assert body == before


def test_streaming_is_rejected_naming_params_stream() -> None:
    """stream: true cannot run in a batch, and the error names the field."""
    assert wire_error(raw_params(stream=True)) == "params.stream: streaming is not supported in batches"


def test_stream_false_is_accepted_and_dropped() -> None:
    """stream: false is the batch default, so it is accepted and not copied."""
    assert "stream" not in translate(stream=False)


@pytest.mark.parametrize("model", [None, "", 42])
def test_missing_or_non_string_model_is_rejected(model: Any) -> None:
    """model is required and must be a non-empty string."""
    raw = raw_params()
    raw["model"] = model
    assert wire_error(raw).startswith("params.model:")


@pytest.mark.parametrize("max_tokens", [None, 0, -1, 1.5, "10", True])
def test_max_tokens_that_is_not_a_positive_integer_is_rejected(max_tokens: Any) -> None:
    """max_tokens is required and must be an integer >= 1 (bool is not an integer here)."""
    raw = raw_params()
    raw["max_tokens"] = max_tokens
    assert wire_error(raw).startswith("params.max_tokens:")


@pytest.mark.parametrize("messages", [None, [], "Hi", {"role": "user"}])
def test_missing_empty_or_non_list_messages_are_rejected(messages: Any) -> None:
    """messages is required and must be a non-empty list."""
    raw = raw_params()
    raw["messages"] = messages
    assert wire_error(raw).startswith("params.messages:")


def test_stop_sequences_become_stop() -> None:
    """stop_sequences become Chat's stop list, all of them (no cut at OpenAI's 4)."""
    seqs = ["\n\n", "END", "a", "b", "c"]
    assert translate(stop_sequences=seqs)["stop"] == seqs


def test_empty_stop_sequences_are_omitted() -> None:
    """An empty stop_sequences list means no stop strings, so no stop key."""
    assert "stop" not in translate(stop_sequences=[])


@pytest.mark.parametrize("stop", ["END", [1], [None]])
def test_stop_sequences_that_are_not_a_list_of_strings_are_rejected(stop: Any) -> None:
    """stop_sequences must be a list of strings."""
    assert wire_error(raw_params(stop_sequences=stop)).startswith("params.stop_sequences:")


@pytest.mark.parametrize("value", [0, 0.0, 0.7, 1.0])
def test_temperature_and_top_p_pass_through_unchanged(value: float) -> None:
    """Anthropic's 0..1 sits inside OpenAI's 0..2, so temperature and top_p are copied as they are."""
    out = translate(temperature=value, top_p=value)
    assert (out["temperature"], out["top_p"]) == (value, value)


@pytest.mark.parametrize("key", ["temperature", "top_p"])
def test_sampling_params_that_are_not_numbers_are_rejected(key: str) -> None:
    """temperature and top_p must be numbers, naming the field."""
    assert wire_error(raw_params(**{key: "hot"})).startswith(f"params.{key}:")
    assert wire_error(raw_params(**{key: True})).startswith(f"params.{key}:")


def test_metadata_user_id_becomes_user() -> None:
    """metadata.user_id is Chat's user."""
    assert translate(metadata={"user_id": "u-123"})["user"] == "u-123"


def test_metadata_without_user_id_sets_no_user() -> None:
    """Empty metadata or a null user_id leaves user unset."""
    assert "user" not in translate(metadata={})
    assert "user" not in translate(metadata={"user_id": None})


@pytest.mark.parametrize(
    ("metadata", "path"), [("u-1", "params.metadata:"), ({"user_id": 7}, "params.metadata.user_id:")]
)
def test_malformed_metadata_is_rejected(metadata: Any, path: str) -> None:
    """metadata must be an object and its user_id a string."""
    assert wire_error(raw_params(metadata=metadata)).startswith(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("top_k", 5),
        ("service_tier", "auto"),
        ("container", "container_1"),
        ("inference_geo", "us"),
        ("speed", "fast"),
        ("user_profile_id", "prof_1"),
        ("workspace_id", "wrkspc_1"),
        ("output_config", {"effort": "low"}),
    ],
)
def test_params_without_a_chat_equivalent_are_dropped(key: str, value: Any) -> None:
    """top_k, service_tier and the other Anthropic-only keys with no use in Headrace are dropped."""
    assert translate(**{key: value}) == translate()


@pytest.mark.parametrize(
    ("key", "value"),
    [("thinking", {"type": "enabled", "budget_tokens": 2048}), ("cache_control", {"type": "ephemeral"})],
)
def test_thinking_and_the_automatic_cache_breakpoint_are_kept_for_anthropic_deployments(
    key: str, value: Any
) -> None:
    """thinking and a top-level cache_control ride in the canonical body, as given."""
    assert translate(**{key: value}) == {**translate(), key: value}


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("thinking", "on", "params.thinking:"),
        ("cache_control", {"type": "persistent"}, "params.cache_control:"),
        ("cache_control", {"type": "ephemeral", "ttl": "2h"}, "params.cache_control:"),
    ],
)
def test_a_malformed_thinking_or_cache_control_is_rejected_naming_it(key: str, value: Any, path: str) -> None:
    assert wire_error(raw_params(**{key: value})).startswith(path)


def test_unknown_keys_are_dropped() -> None:
    """A key neither API knows never reaches the stored body."""
    raw = raw_params(some_future_param={"x": 1})
    assert messages_params_to_chat(raw) == translate()


def test_params_that_are_not_an_object_are_rejected() -> None:
    """params must be an object."""
    with pytest.raises(WireError, match=r"^params: must be an object"):
        messages_params_to_chat(["not", "params"])  # type: ignore[arg-type]


# system prompts


def test_string_system_becomes_the_first_message() -> None:
    """A string system prompt becomes a system message ahead of the conversation."""
    out = translate(system="Be terse.")
    assert out["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


def test_system_text_blocks_are_joined_with_blank_lines() -> None:
    """System text blocks without a cache breakpoint join with "\\n\\n" into one string."""
    system = [_text("You are terse."), _text("Answer in French.")]
    assert translate(system=system)["messages"][0] == {
        "role": "system",
        "content": "You are terse.\n\nAnswer in French.",
    }


def test_system_blocks_with_a_cache_breakpoint_stay_parts_with_their_cache_control() -> None:
    """A breakpoint on a system block keeps the blocks as text parts, the marker where it was."""
    system = [_text("You are terse."), _text("Answer in French.", cache_control={"type": "ephemeral"})]
    assert translate(system=system)["messages"][0] == {"role": "system", "content": system}


def test_empty_system_is_omitted() -> None:
    """An empty system prompt adds no system message."""
    assert translate(system="")["messages"] == [{"role": "user", "content": "Hi"}]
    assert translate(system=[])["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("system", "path"), [([_text("a"), _image_b64()], "params.system[1]:"), (5, "params.system:")]
)
def test_system_that_is_not_text_is_rejected_naming_the_block(system: Any, path: str) -> None:
    """system must be a string or a list of text blocks; the error names the offending block."""
    assert wire_error(raw_params(system=system)).startswith(path)


def test_system_role_messages_become_system_messages_in_place() -> None:
    """MessageParam (anthropic 2.12) allows role "system": it stays in place, after the top-level system."""
    out = translate(
        [_user("a"), {"role": "system", "content": [_text("x"), _text("y")]}, _user("b")], system="s"
    )
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("system", "s"),
        ("user", "a"),
        ("system", "x\n\ny"),
        ("user", "b"),
    ]


# messages and content blocks


@pytest.mark.parametrize("role", ["tool", "developer", None])
def test_message_role_other_than_user_or_assistant_is_rejected(role: Any) -> None:
    """Roles are user and assistant (and system); anything else names the message's role."""
    err = wire_error(raw_params([_user("a"), {"role": role, "content": "b"}]))
    assert err.startswith("params.messages[1].role:")


def test_message_that_is_not_an_object_is_rejected() -> None:
    """Each message must be an object."""
    assert wire_error(raw_params([_user("a"), "b"])).startswith("params.messages[1]:")


def test_lone_text_block_becomes_a_plain_string() -> None:
    """A content list of one text block becomes the plain-string shorthand."""
    assert translate([_user([_text("Hi")])]) == translate()


def test_a_block_with_a_cache_breakpoint_keeps_it_and_is_never_shortened() -> None:
    """cache_control on a text or image block stays on its Chat part; a lone text part stays a part."""
    marked = _text("Hi", cache_control={"type": "ephemeral", "ttl": "1h"})
    assert translate([_user([marked])])["messages"] == [{"role": "user", "content": [marked]}]
    image = {**_image_b64(), "cache_control": {"type": "ephemeral"}}
    (part,) = translate([_user([image])])["messages"][0]["content"]
    assert part["type"] == "image_url" and part["cache_control"] == {"type": "ephemeral"}


def test_several_text_blocks_stay_separate_text_parts() -> None:
    """Several text blocks keep their boundaries as Chat text parts."""
    out = translate([_user([_text("a"), _text("b")])])
    assert out["messages"] == [{"role": "user", "content": [_text("a"), _text("b")]}]


def test_base64_image_becomes_a_data_url_image_part() -> None:
    """A base64 image becomes an image_url part with a data:<media_type>;base64,<data> URL."""
    out = translate([_user([_text("What is this?"), _image_b64("image/jpeg")])])
    assert out["messages"][0]["content"] == [
        _text("What is this?"),
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_DATA}"}},
    ]


def test_url_image_becomes_an_image_part_with_that_url() -> None:
    """A url image source becomes an image_url part with the same URL."""
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    out = translate([_user([image])])
    assert out["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    ]


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ({"type": "file", "file_id": "file_1"}, "params.messages[0].content[0].source:"),
        (
            {"type": "base64", "media_type": "image/tiff", "data": "x"},
            "params.messages[0].content[0].source.media_type:",
        ),
        ({"type": "base64", "media_type": "image/png"}, "params.messages[0].content[0].source.data:"),
        ({"type": "url"}, "params.messages[0].content[0].source.url:"),
        (None, "params.messages[0].content[0].source:"),
    ],
)
def test_images_chat_cannot_take_are_rejected_naming_the_field(source: Any, path: str) -> None:
    """File sources, unknown media types and sources missing their data are rejected by path."""
    assert wire_error(raw_params([_user([{"type": "image", "source": source}])])).startswith(path)


def test_document_block_is_rejected_with_a_clear_message() -> None:
    """A document block has no Chat equivalent: the error names the block and says so."""
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    err = wire_error(params([_user("a"), _assistant("b"), _user([_text("read"), document])]))
    assert err.startswith("params.messages[2].content[1]: unsupported block type 'document'")
    assert "Chat Completions" in err


@pytest.mark.parametrize("kind", ["search_result", "server_tool_use", "container_upload", "bogus"])
def test_unknown_block_types_are_rejected_naming_the_block(kind: str) -> None:
    """Any block type outside text/image/tool_use/tool_result/thinking is rejected by path and type."""
    err = wire_error(raw_params([_user([_text("a"), {"type": kind}])]))
    assert err == f"params.messages[0].content[1]: unsupported block type {kind!r} in user messages"


@pytest.mark.parametrize("block", ["text", {"text": "no type"}, {"type": 3}])
def test_malformed_blocks_are_rejected(block: Any) -> None:
    """A block must be an object with a string type."""
    err = wire_error(raw_params([_user([block])]))
    assert err.startswith("params.messages[0].content[0]: must be a content block")


@pytest.mark.parametrize(
    ("content", "path"),
    [
        ([], "params.messages[0].content: must not be empty"),
        (None, "params.messages[0].content: must be a string or a list"),
        ([{"type": "text"}], "params.messages[0].content[0].text:"),
    ],
)
def test_empty_or_malformed_content_is_rejected(content: Any, path: str) -> None:
    """Content is a string or a non-empty list of blocks; a text block needs its text."""
    assert wire_error(raw_params([_user(content)])).startswith(path)


def test_assistant_tool_use_becomes_tool_calls_with_json_arguments() -> None:
    """tool_use blocks become function tool_calls with arguments json.dumps(input); text stays content."""
    out = translate(
        [
            _user("Weather in Paris and Lyon?"),
            _assistant(
                [
                    _text("Checking."),
                    _tool_use("toolu_1", "get_weather", {"city": "Paris"}),
                    _tool_use("toolu_2", "get_weather", {"city": "Lyon", "units": ["C"]}),
                ]
            ),
        ],
        tools=[WEATHER_TOOL],
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            _call("toolu_1", "get_weather", json.dumps({"city": "Paris"})),
            _call("toolu_2", "get_weather", json.dumps({"city": "Lyon", "units": ["C"]})),
        ],
    }


def test_assistant_with_only_tool_use_has_null_content() -> None:
    """An assistant turn of tool calls alone has content null, as Chat expects."""
    out = translate([_user("a"), _assistant([_tool_use("t1", "f", {})])], tools=[WEATHER_TOOL])
    assert out["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [_call("t1", "f", "{}")],
    }


def test_assistant_string_content_passes_through() -> None:
    """A string assistant message (history or prefill) is kept as is."""
    assert translate([_user("a"), _assistant("b")])["messages"][1] == {"role": "assistant", "content": "b"}


@pytest.mark.parametrize(
    ("block", "path"),
    [
        ({"type": "tool_use", "name": "f", "input": {}}, ".id:"),
        ({"type": "tool_use", "id": "t1", "input": {}}, ".name:"),
        ({"type": "tool_use", "id": "t1", "name": "f", "input": "{}"}, ".input:"),
    ],
)
def test_malformed_tool_use_is_rejected_naming_the_field(block: dict[str, Any], path: str) -> None:
    """tool_use needs a string id and name and an object input."""
    err = wire_error(raw_params([_user("a"), _assistant([block])]))
    assert err.startswith(f"params.messages[1].content[0]{path}")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [_user([_tool_use("t1", "f", {})])],
            "params.messages[0].content[0]: unsupported block type 'tool_use' in user messages",
        ),
        (
            [_user("a"), _assistant([_image_b64()])],
            "params.messages[1].content[0]: unsupported block type 'image' in assistant messages",
        ),
        (
            [_user("a"), _assistant([_tool_result("t1")])],
            "params.messages[1].content[0]: unsupported block type 'tool_result' in assistant messages",
        ),
    ],
)
def test_blocks_in_the_wrong_role_are_rejected(messages: list[dict[str, Any]], message: str) -> None:
    """tool_use belongs to assistant turns; images and tool_result to user turns."""
    assert wire_error(raw_params(messages)) == message


def test_tool_results_become_tool_messages_before_the_rest_of_the_turn() -> None:
    """tool_result blocks become role "tool" messages, in order, ahead of that turn's other content."""
    out = translate(
        [
            _user("Weather?"),
            _assistant(
                [
                    _tool_use("t1", "get_weather", {"city": "Paris"}),
                    _tool_use("t2", "get_weather", {"city": "Lyon"}),
                ]
            ),
            _user([_text("Thanks, and summarise."), _tool_result("t1", "18C"), _tool_result("t2", "20C")]),
        ],
        tools=[WEATHER_TOOL],
    )
    assert out["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "18C"},
        {"role": "tool", "tool_call_id": "t2", "content": "20C"},
        {"role": "user", "content": "Thanks, and summarise."},
    ]


def test_tool_result_text_blocks_join_into_one_string_and_is_error_passes_only_content() -> None:
    """tool_result content as text blocks joins with "\\n\\n"; is_error adds nothing to the content."""
    result = _tool_result("t1", [_text("line 1"), _text("line 2")], is_error=True)
    out = translate(
        [_user("a"), _assistant([_tool_use("t1", "f", {})]), _user([result])], tools=[WEATHER_TOOL]
    )
    assert out["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": "line 1\n\nline 2"}]


def test_tool_result_without_content_becomes_empty_content() -> None:
    """content is optional on tool_result; the tool message then carries an empty string."""
    result = {"type": "tool_result", "tool_use_id": "t1"}
    out = translate(
        [_user("a"), _assistant([_tool_use("t1", "f", {})]), _user([result])], tools=[WEATHER_TOOL]
    )
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": ""}


@pytest.mark.parametrize(
    ("result", "path"),
    [
        (_tool_result("t1", [_text("see"), _image_b64()]), "params.messages[0].content[0].content[1]:"),
        ({"type": "tool_result", "content": "x"}, "params.messages[0].content[0].tool_use_id:"),
        (_tool_result("t1", 5), "params.messages[0].content[0].content:"),
    ],
)
def test_tool_results_chat_cannot_take_are_rejected(result: dict[str, Any], path: str) -> None:
    """Chat tool messages are text only and need the call id: images, a missing id or odd content fail."""
    assert wire_error(raw_params([_user([result])])).startswith(path)


def test_thinking_blocks_ride_on_their_assistant_turn_and_a_thinking_only_turn_is_skipped() -> None:
    """An assistant turn's thinking and redacted_thinking blocks become its thinking_blocks, in order
    and unmodified; a turn of thinking blocks only disappears (Chat rejects an empty message)."""
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "sig"}
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    out = translate(
        [
            _user("a"),
            _assistant([thinking, redacted]),
            _user("b"),
            _assistant([thinking, redacted, _text("c")]),
        ]
    )
    assert out["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c", "thinking_blocks": [thinking, redacted]},
    ]


# tools and tool_choice


def test_tools_become_function_tools_keeping_cache_control_and_dropping_strict() -> None:
    """name/description/input_schema become a function tool; cache_control stays on it, strict goes."""
    no_description = {"name": "ping", "input_schema": {"type": "object"}, "type": "custom", "strict": True}
    tools = [{**WEATHER_TOOL, "cache_control": {"type": "ephemeral"}}, no_description]
    out = translate(tools=tools)
    assert out["tools"] == [
        {**CHAT_WEATHER_TOOL, "cache_control": {"type": "ephemeral"}},
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}},
    ]


@pytest.mark.parametrize(
    ("tool", "path"),
    [
        ({"type": "web_search_20250305", "name": "web_search"}, "params.tools[0].type:"),
        ({"type": "bash_20250124", "name": "bash"}, "params.tools[0].type:"),
        ({"name": "f"}, "params.tools[0].input_schema:"),
        ({"input_schema": SCHEMA}, "params.tools[0].name:"),
        ("f", "params.tools[0]:"),
    ],
)
def test_tools_chat_cannot_take_are_rejected_naming_the_tool(tool: Any, path: str) -> None:
    """Server tools and tools without a name or input_schema are rejected by path."""
    assert wire_error(raw_params(tools=[tool])).startswith(path)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_tool_choice_maps_to_chat(choice: dict[str, Any], expected: Any) -> None:
    """auto/any/none/tool become "auto"/"required"/"none"/a named function."""
    out = translate(tools=[WEATHER_TOOL], tool_choice=choice)
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize("kind", ["auto", "any", "tool"])
def test_disable_parallel_tool_use_becomes_parallel_tool_calls_false(kind: str) -> None:
    """disable_parallel_tool_use: true is parallel_tool_calls: false; false changes nothing."""
    choice = {"type": kind, "name": "get_weather"} if kind == "tool" else {"type": kind}
    assert (
        translate(tools=[WEATHER_TOOL], tool_choice={**choice, "disable_parallel_tool_use": True})[
            "parallel_tool_calls"
        ]
        is False
    )
    assert "parallel_tool_calls" not in translate(
        tools=[WEATHER_TOOL], tool_choice={**choice, "disable_parallel_tool_use": False}
    )


@pytest.mark.parametrize(
    ("choice", "path"),
    [
        ({"type": "required"}, "params.tool_choice.type:"),
        ("auto", "params.tool_choice.type:"),
        ({"type": "tool"}, "params.tool_choice.name:"),
    ],
)
def test_malformed_tool_choice_is_rejected(choice: Any, path: str) -> None:
    """tool_choice must be an object of a known type; type tool needs a name."""
    assert wire_error(raw_params(tools=[WEATHER_TOOL], tool_choice=choice)).startswith(path)


def test_tool_choice_without_tools_is_dropped_unless_a_tool_is_demanded() -> None:
    """Chat rejects tool_choice without tools: auto/none are dropped, any/tool cannot be met."""
    assert translate(tool_choice={"type": "auto", "disable_parallel_tool_use": True}) == translate()
    assert translate(tool_choice={"type": "none"}, tools=[]) == translate()
    err = wire_error(raw_params(tool_choice={"type": "any"}))
    assert err == "params.tool_choice: type 'any' needs tools, and params has none"


def test_tools_that_are_not_a_list_are_rejected() -> None:
    """tools must be a list."""
    assert wire_error(raw_params(tools=WEATHER_TOOL)).startswith("params.tools:")


# round trip


def _conversation() -> dict[str, Any]:
    return params(
        [
            _user([_text("What is in this picture, and what's the weather there?"), _image_b64()]),
            _assistant(
                [
                    _text("A street in Paris. Checking."),
                    _tool_use("toolu_1", "get_weather", {"city": "Paris"}),
                ]
            ),
            _user([_tool_result("toolu_1", "18C, cloudy"), _text("Thanks. Short answer please.")]),
        ],
        system=[_text("You are terse.", cache_control={"type": "ephemeral"})],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        stop_sequences=["\n\nHuman:"],
        temperature=0.2,
        metadata={"user_id": "u-123"},
        thinking={"type": "enabled", "budget_tokens": 1024},
    )


def test_conversation_with_system_tools_tool_exchange_and_image_becomes_a_valid_chat_body() -> None:
    """The full feature set translates into one Chat body, field by field, openai-valid once the
    Anthropic-only parts an OpenAI deployment is never sent are left out."""
    out = messages_params_to_chat(_conversation())
    assert_valid_chat_body(dict(without_anthropic_parts(out)))
    assert out == {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": [_text("You are terse.", cache_control={"type": "ephemeral"})]},
            {
                "role": "user",
                "content": [
                    _text("What is in this picture, and what's the weather there?"),
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_DATA}"}},
                ],
            },
            {
                "role": "assistant",
                "content": "A street in Paris. Checking.",
                "tool_calls": [_call("toolu_1", "get_weather", '{"city": "Paris"}')],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, cloudy"},
            {"role": "user", "content": "Thanks. Short answer please."},
        ],
        "stop": ["\n\nHuman:"],
        "temperature": 0.2,
        "user": "u-123",
        "tools": [CHAT_WEATHER_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }


def test_worker_translation_of_the_chat_body_gives_back_the_anthropic_params() -> None:
    """Going on through the worker's Chat -> Anthropic translator restores the params, cache_control
    and thinking included."""
    original = _conversation()
    back = chat_to_messages(messages_params_to_chat(original), model=MODEL, default_max_tokens=1)
    assert back == original


# chat_to_message


def completion(
    content: str | None = "Hello!",
    *,
    finish_reason: str | None = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_711_475_054,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 24, "completion_tokens": 15, "total_tokens": 39},
        **fields,
    }


def to_message(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """chat_to_message, checked to parse as anthropic's Message."""
    out = chat_to_message(raw, **kwargs)
    Message.model_validate(out)
    return out


def test_text_completion_becomes_a_message() -> None:
    """A text reply becomes a Message with one text block, the completion's model, end_turn and usage."""
    assert to_message(completion()) == {
        "id": "msg_abc123",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-mini",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 24,
            "output_tokens": 15,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        },
    }


def test_message_id_argument_wins_over_the_derived_one() -> None:
    """An explicit message_id is used as is."""
    assert to_message(completion(), message_id="msg_custom")["id"] == "msg_custom"


@pytest.mark.parametrize(
    ("completion_id", "message_id"),
    [("chatcmpl-abc", "msg_abc"), ("resp-9", "msg_resp-9"), ("chatcmpl-msg_01XYZ", "msg_01XYZ")],
)
def test_message_id_is_derived_from_the_completion_id(completion_id: str, message_id: str) -> None:
    """The id is "msg_" + the completion id without "chatcmpl-", never doubling an existing "msg_"."""
    assert to_message(completion(id=completion_id))["id"] == message_id


def test_tool_calls_become_tool_use_blocks_after_the_text() -> None:
    """Each tool call becomes a tool_use block with parsed input, after the text block."""
    calls = [_call("call_1", "get_weather", '{"city": "Paris"}'), _call("call_2", "get_time", "{}")]
    out = to_message(completion("Let me check.", finish_reason="tool_calls", tool_calls=calls))
    assert out["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
    ]
    assert out["stop_reason"] == "tool_use"


@pytest.mark.parametrize("arguments", ['{"city": "Par', "", "[1, 2]", '"text"', "null"])
def test_tool_call_arguments_that_are_not_a_json_object_become_empty_input(arguments: str) -> None:
    """Invalid, empty or non-object JSON arguments become input {} (Anthropic's input is an object)."""
    out = to_message(completion(None, tool_calls=[_call("call_1", "f", arguments)]))
    assert out["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {}}]


def test_custom_tool_calls_are_skipped() -> None:
    """Free-text custom tool calls have no JSON input, so they yield no tool_use block."""
    custom = {"id": "call_1", "type": "custom", "custom": {"name": "grammar", "input": "x"}}
    assert to_message(completion("ok", tool_calls=[custom]))["content"] == [{"type": "text", "text": "ok"}]


@pytest.mark.parametrize("content", [None, ""])
def test_no_text_and_no_tool_calls_gives_empty_content(content: str | None) -> None:
    """With neither text nor tool calls the content list is empty, which Message allows."""
    assert to_message(completion(content))["content"] == []


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("something_new", "end_turn"),
    ],
)
def test_finish_reason_maps_to_stop_reason(finish_reason: str | None, stop_reason: str) -> None:
    """finish_reason maps per the reference table; null or unknown reasons are end_turn."""
    out = to_message(completion(finish_reason=finish_reason))
    assert (out["stop_reason"], out["stop_sequence"]) == (stop_reason, None)


def test_refusal_becomes_text_with_stop_reason_refusal() -> None:
    """OpenAI's refusal field (with no content) is the Message's text, with stop_reason refusal."""
    raw = completion(None)
    raw["choices"][0]["message"]["refusal"] = "I can't help with that."
    out = to_message(raw)
    assert out["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert out["stop_reason"] == "refusal"


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {
                "prompt_tokens": 100,
                "completion_tokens": 7,
                "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
            },
            (10, 7, 60, 30),
        ),
        (
            {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}},
            (40, 7, 60, 0),
        ),
        ({"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": None}, (100, 7, 0, 0)),
        (
            {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}},
            (0, 1, 9, 0),
        ),
        (None, (0, 0, 0, 0)),
    ],
)
def test_usage_subtracts_cache_tokens_from_input_tokens(
    usage: Any, expected: tuple[int, int, int, int]
) -> None:
    """input_tokens = prompt - cached - cache writes (never below 0); missing details count as 0."""
    out = to_message(completion(usage=usage))["usage"]
    keys = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    assert tuple(out[k] for k in keys) == expected


@pytest.mark.parametrize(
    "raw",
    [
        {"id": "chatcmpl-1", "model": "m", "choices": []},
        {"id": "chatcmpl-1", "model": "m"},
        {"id": "chatcmpl-1", "choices": [{"message": {"content": "x"}}]},
        {"model": "m", "choices": [{"message": {"content": "x"}}]},
        completion(tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
    ],
)
def test_unreadable_completion_raises_value_error_not_wire_error(raw: dict[str, Any]) -> None:
    """A completion missing choices, model, id or a tool call id is Headrace's problem, not the producer's."""
    with pytest.raises(ValueError) as info:
        chat_to_message(raw)
    assert not isinstance(info.value, WireError)


def test_succeeded_result_line_parses_as_an_individual_response() -> None:
    """A succeeded result carrying chat_to_message's Message parses as the SDK's result line."""
    message = chat_to_message(completion("Hi", tool_calls=[_call("c1", "f", '{"a": 1}')]))
    line = MessageBatchIndividualResponse.model_validate(
        {"custom_id": "r1", "result": {"type": "succeeded", "message": message}}
    )
    assert line.result.type == "succeeded"
    assert line.result.message.model_dump(mode="json", exclude_unset=True) == message


def test_worker_reply_translation_round_trips_to_the_original_message() -> None:
    """An Anthropic reply turned into a chat.completion by the worker comes back as the same Message."""
    original = {
        "id": "msg_01XYZ",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Lyon"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "output_tokens": 30,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 10,
        },
    }
    assert to_message(message_to_chat(original, created=0)) == original


# error_result


def _parses(result: dict[str, Any]) -> bool:
    try:
        MessageBatchIndividualResponse.model_validate({"custom_id": "x", "result": result})
    except ValidationError:
        return False
    return True


def test_error_result_has_the_double_nested_errored_shape() -> None:
    """An errored result wraps an ErrorResponse envelope around the error object."""
    result = error_result("invalid_request_error", "params.max_tokens: required")
    assert result == {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "params.max_tokens: required"},
        },
    }
    line = MessageBatchIndividualResponse.model_validate({"custom_id": "x", "result": result})
    assert line.result.type == "errored"
    assert line.result.error.error.message == "params.max_tokens: required"


@pytest.mark.parametrize("kind", get_args(ErrorType))
def test_every_error_type_the_sdk_can_parse_is_kept_and_the_rest_become_api_error(kind: str) -> None:
    """Each SDK ErrorType is kept if a result line carrying it parses, else it falls back to api_error."""
    raw = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "m"}}}
    result = error_result(kind, "m")
    assert _parses(result)
    assert result["error"]["error"]["type"] == (kind if _parses(raw) else "api_error")


@pytest.mark.parametrize("kind", ["nonsense_error", "", "Invalid_Request_Error"])
def test_unknown_error_kinds_fall_back_to_api_error(kind: str) -> None:
    """A kind outside the SDK's ErrorType becomes api_error, keeping the message."""
    result = error_result(kind, "boom")
    assert result["error"]["error"] == {"type": "api_error", "message": "boom"}
    assert _parses(result)
