"""Chat Completions <-> Anthropic Messages translation, checked against both official SDKs' types."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterable
from typing import Any

import pytest
from anthropic.types import Message, message_create_params
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall
from pydantic import TypeAdapter

from workers.providers.anthropic_translate import chat_to_messages, message_to_chat, usage_from_message
from workers.providers.base import TranslationError, Usage

MODEL = "claude-sonnet-4-5"
_CREATE_PARAMS = TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)
# Sent in the wire body but, since anthropic 1.0, absent from the SDK's typed params (extra_body).
_UNTYPED_KEYS = ("temperature", "top_p")

PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": False,
    },
}


def translate(messages: list[dict[str, Any]] | None = None, **params: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": messages or [{"role": "user", "content": "Hi"}], **params}
    out = chat_to_messages(body, model=MODEL, default_max_tokens=1024)
    assert_valid_anthropic_body(out)
    return out


def _materialize(value: Any) -> Any:
    # Pydantic validates Iterable[...] fields lazily; walking them runs the validation.
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_materialize(v) for v in value]
    return value


def assert_valid_anthropic_body(body: dict[str, Any]) -> None:
    """The body fits anthropic's MessageCreateParams TypedDicts, with no key they don't know."""
    typed = {k: v for k, v in body.items() if k not in _UNTYPED_KEYS}
    # Validation drops keys a TypedDict doesn't declare, so equality means none were unknown.
    assert _materialize(_CREATE_PARAMS.validate_python(typed)) == typed
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "user"
    assert all(a != b for a, b in itertools.pairwise(roles)), roles
    for m in body["messages"]:
        if isinstance(m["content"], list):
            kinds = [b["type"] for b in m["content"]]
            assert kinds == sorted(kinds, key=lambda k: k != "tool_result"), kinds


def anthropic_message(content: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    raw = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 50, "output_tokens": 30},
        **fields,
    }
    return Message.model_validate(raw).model_dump(mode="json")


def to_chat(message: dict[str, Any], **kwargs: Any) -> ChatCompletion:
    out = message_to_chat(message, created=1_711_475_054, **kwargs)
    return ChatCompletion.model_validate(out)


# chat_to_messages: the envelope


def test_minimal_request_becomes_a_minimal_messages_body() -> None:
    """A one-message request keeps its text, takes the deployment's model and the default max_tokens."""
    assert translate() == {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hi"}],
    }


def test_input_body_is_not_mutated() -> None:
    """Translation is pure: the canonical body is left exactly as it was."""
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [_call("c1", "get_weather", '{"city":"Paris"}')]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ],
        "tools": [WEATHER_TOOL],
        "parallel_tool_calls": False,
    }
    before = copy.deepcopy(body)
    out = chat_to_messages(body, model=MODEL, default_max_tokens=10)
    out["tools"][0]["input_schema"]["properties"]["x"] = {}
    assert body == before


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"max_completion_tokens": 256, "max_tokens": 99}, 256),
        ({"max_tokens": 99}, 99),
        ({}, 1024),
        ({"max_completion_tokens": None, "max_tokens": None}, 1024),
    ],
)
def test_max_tokens_prefers_max_completion_tokens_then_max_tokens_then_default(
    params: dict[str, Any], expected: int
) -> None:
    """max_tokens comes from max_completion_tokens, else max_tokens, else the deployment default."""
    assert translate(**params)["max_tokens"] == expected


@pytest.mark.parametrize("bad", [0, -5, "100", 1.5, True])
def test_max_tokens_that_is_not_a_positive_integer_is_rejected(bad: Any) -> None:
    """A max token count that is not a positive integer is the request's fault."""
    with pytest.raises(TranslationError, match="max_completion_tokens"):
        translate(max_completion_tokens=bad)


@pytest.mark.parametrize(
    ("stop", "expected"), [("\n\n", ["\n\n"]), (["END", "STOP"], ["END", "STOP"]), (None, None), ([], None)]
)
def test_stop_becomes_a_stop_sequences_list(stop: Any, expected: list[str] | None) -> None:
    """stop as a string or list becomes the stop_sequences list; absent or empty sends none."""
    assert translate(stop=stop).get("stop_sequences") == expected


def test_stop_of_the_wrong_type_is_rejected() -> None:
    """stop that is neither a string nor a list of strings is rejected."""
    with pytest.raises(TranslationError, match="stop"):
        translate(stop=[1, 2])


@pytest.mark.parametrize(("given", "sent"), [(0, 0), (0.2, 0.2), (1.0, 1.0), (1.5, 1.0), (2, 1.0), (-1, 0.0)])
def test_temperature_is_clamped_into_anthropics_range_not_scaled(given: float, sent: float) -> None:
    """OpenAI's 0..2 temperature is clamped to Anthropic's 0..1, values inside it pass unchanged."""
    assert translate(temperature=given)["temperature"] == sent


def test_null_sampling_params_are_omitted() -> None:
    """temperature and top_p set to null mean the provider default, so neither is sent."""
    out = translate(temperature=None, top_p=None)
    assert "temperature" not in out and "top_p" not in out


def test_temperature_that_is_not_a_number_is_rejected() -> None:
    """A non-numeric temperature is the request's fault."""
    with pytest.raises(TranslationError, match="temperature"):
        translate(temperature="hot")


def test_top_p_passes_through() -> None:
    """top_p is sent unchanged."""
    assert translate(top_p=0.9)["top_p"] == 0.9


def test_user_becomes_metadata_user_id_and_openai_metadata_is_dropped() -> None:
    """user maps to Anthropic's metadata.user_id; OpenAI's own metadata is never forwarded."""
    out = translate(user="u-123", metadata={"team": "search"})
    assert out["metadata"] == {"user_id": "u-123"}


def test_safety_identifier_is_used_when_user_is_absent() -> None:
    """safety_identifier, OpenAI's successor to user, also maps to metadata.user_id."""
    assert translate(safety_identifier="hash-1")["metadata"] == {"user_id": "hash-1"}


# chat_to_messages: what Anthropic cannot do


def test_n_above_one_is_rejected_and_n_of_one_is_fine() -> None:
    """n > 1 has no Anthropic equivalent and is rejected; n = 1 is the default and accepted."""
    assert "n" not in translate(n=1)
    with pytest.raises(TranslationError, match="n=2"):
        translate(n=2)


def test_streaming_is_rejected() -> None:
    """stream: true is rejected; stream: false is the only mode there is."""
    assert "stream" not in translate(stream=False)
    with pytest.raises(TranslationError, match="stream"):
        translate(stream=True)


@pytest.mark.parametrize(
    "fmt", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}]
)
def test_structured_response_format_is_rejected(fmt: dict[str, Any]) -> None:
    """A response_format other than text is not supported on Anthropic deployments."""
    with pytest.raises(TranslationError, match="not supported on Anthropic deployments"):
        translate(response_format=fmt)


def test_text_response_format_is_accepted_and_not_sent() -> None:
    """response_format {type: text} is the default and is simply dropped."""
    assert "response_format" not in translate(response_format={"type": "text"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("logit_bias", {"50256": -100}),
        ("seed", 1),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("service_tier", "default"),
        ("store", True),
        ("stream_options", {"include_usage": True}),
        ("metadata", {"k": "v"}),
        ("reasoning_effort", "low"),
        ("some_future_param", {"x": 1}),
    ],
)
def test_params_without_an_anthropic_equivalent_are_dropped(key: str, value: Any) -> None:
    """Known OpenAI-only params and unknown keys are dropped, never sent to Anthropic."""
    out = translate(**{key: value})
    assert out == {"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    "params",
    [
        {"functions": [{"name": "f", "parameters": {"type": "object"}}]},
        {"function_call": "auto"},
    ],
)
def test_legacy_function_calling_params_are_rejected(params: dict[str, Any]) -> None:
    """The legacy functions/function_call params are rejected rather than silently ignored."""
    with pytest.raises(TranslationError, match="legacy"):
        translate(**params)


# chat_to_messages: messages


def test_system_and_developer_messages_are_hoisted_in_order_and_joined() -> None:
    """system and developer messages, wherever they appear, become one \\n\\n-joined system string."""
    out = translate(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": "Answer in French."},
            {"role": "assistant", "content": "Salut"},
        ]
    )
    assert out["system"] == "You are terse.\n\nAnswer in French."
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]


def test_system_content_parts_become_text_blocks() -> None:
    """If any system message uses content parts, system is a list of text blocks, one per part."""
    out = translate(
        [
            {"role": "system", "content": "A."},
            {
                "role": "developer",
                "content": [{"type": "text", "text": "B."}, {"type": "text", "text": "C."}],
            },
            {"role": "user", "content": "Hi"},
        ]
    )
    assert out["system"] == [{"type": "text", "text": t} for t in ("A.", "B.", "C.")]


def test_system_message_with_an_image_is_rejected() -> None:
    """A system message can only hold text; an image part there names its index and type."""
    with pytest.raises(TranslationError, match=r"messages\[0\].*'image_url'"):
        translate([{"role": "system", "content": [_image_part("https://x/y.png")]}, _user("Hi")])


def test_user_text_and_image_parts_become_blocks() -> None:
    """A user part list keeps its order: text blocks, and a data: URL image as a base64 block."""
    out = translate(
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, _image_part(PNG_URL)]}]
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
    ]


def test_http_image_url_becomes_a_url_image_source_and_detail_is_dropped() -> None:
    """An http(s) image URL becomes a url image source; OpenAI's detail hint has no equivalent."""
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}
    out = translate([{"role": "user", "content": [part]}])
    assert out["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
    ]


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png,rawbytes", "base64"),
        ("data:image/bmp;base64,Qk0=", "image/bmp"),
        ("ftp://example.com/cat.png", "data: or http"),
    ],
)
def test_images_anthropic_cannot_take_are_rejected(url: str, match: str) -> None:
    """Non-base64 data URLs, media types Anthropic lacks and other URL schemes are rejected."""
    with pytest.raises(TranslationError, match=match):
        translate([_user("Hi"), _assistant("Yes?"), {"role": "user", "content": [_image_part(url)]}])


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ],
)
def test_unsupported_content_part_names_message_index_and_part_type(part: dict[str, Any]) -> None:
    """A content part type Anthropic cannot take is rejected, naming the message index and part type."""
    with pytest.raises(TranslationError, match=rf"messages\[2\].*'{part['type']}'"):
        translate([_user("Hi"), _assistant("Yes?"), {"role": "user", "content": [part]}])


def test_assistant_tool_calls_become_tool_use_blocks_after_text() -> None:
    """Assistant tool_calls become tool_use blocks with parsed input, after the assistant's text."""
    out = translate(
        [
            _user("Weather in Paris and Lyon?"),
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    _call("call_1", "get_weather", '{"city": "Paris"}'),
                    _call("call_2", "get_weather", '{"city": "Lyon"}'),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "20C"},
        ]
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ],
    }


def test_consecutive_tool_messages_merge_into_one_user_message_of_tool_results() -> None:
    """Consecutive tool messages become one user message holding a tool_result block for each."""
    out = translate(
        [
            _user("Weather?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("c1", "f", "{}"), _call("c2", "f", "{}")],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "20C"}]},
            _user("Thanks, and tomorrow?"),
        ]
    )
    assert out["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "20C"},
            {"type": "text", "text": "Thanks, and tomorrow?"},
        ],
    }


def test_tool_results_are_moved_ahead_of_user_text_in_the_same_turn() -> None:
    """A user message between the tool call and its result still yields tool_result first."""
    out = translate(
        [
            _user("Weather?"),
            {"role": "assistant", "tool_calls": [_call("c1", "f", "{}")]},
            _user("Hurry."),
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ]
    )
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]


def test_tool_message_with_several_text_parts_keeps_them_as_blocks() -> None:
    """A tool message's text parts become the tool_result's text blocks; empty content sends none."""
    out = translate(
        [
            _user("Go"),
            {"role": "assistant", "tool_calls": [_call("c1", "f", "{}"), _call("c2", "f", "{}")]},
            {"role": "tool", "tool_call_id": "c1", "content": [_text("a"), _text("b")]},
            {"role": "tool", "tool_call_id": "c2", "content": ""},
        ]
    )
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1", "content": [_text("a"), _text("b")]},
        {"type": "tool_result", "tool_use_id": "c2"},
    ]


def test_tool_message_without_tool_call_id_is_rejected() -> None:
    """A tool message must say which call it answers."""
    with pytest.raises(TranslationError, match=r"messages\[2\].*tool_call_id"):
        translate(
            [
                _user("Go"),
                {"role": "assistant", "tool_calls": [_call("c1", "f", "{}")]},
                {"role": "tool", "content": "x"},
            ]
        )


@pytest.mark.parametrize(("arguments", "match"), [('{"city": ', "not valid JSON"), ("[1, 2]", "JSON object")])
def test_tool_call_arguments_that_are_not_a_json_object_name_the_call(arguments: str, match: str) -> None:
    """Tool call arguments that do not parse to a JSON object are rejected, naming the tool call id."""
    with pytest.raises(TranslationError, match=rf"'call_9'.*{match}"):
        translate([_user("Go"), {"role": "assistant", "tool_calls": [_call("call_9", "f", arguments)]}])


def test_empty_tool_call_arguments_mean_no_arguments() -> None:
    """Empty arguments, as some clients send for a no-argument tool, become an empty input object."""
    out = translate([_user("Go"), {"role": "assistant", "tool_calls": [_call("c1", "now", "")]}])
    assert out["messages"][1]["content"][0]["input"] == {}


def test_legacy_function_role_and_function_call_are_rejected() -> None:
    """Legacy role 'function' and assistant function_call have no tool id to map, so they are rejected."""
    with pytest.raises(TranslationError, match=r"messages\[1\].*'function'"):
        translate([_user("Go"), {"role": "function", "name": "f", "content": "x"}])
    with pytest.raises(TranslationError, match=r"messages\[1\].*function_call"):
        translate([_user("Go"), {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}])


def test_consecutive_same_role_messages_merge_so_roles_alternate() -> None:
    """Consecutive user (or assistant) messages merge into one message of blocks."""
    out = translate([_user("a"), _user("b"), _assistant("c"), _assistant("d"), _user("e")])
    assert out["messages"] == [
        {"role": "user", "content": [_text("a"), _text("b")]},
        {"role": "assistant", "content": [_text("c"), _text("d")]},
        {"role": "user", "content": "e"},
    ]


def test_refusal_parts_in_assistant_history_become_text() -> None:
    """An assistant refusal part is what the assistant said, so it is sent as text."""
    out = translate([_user("a"), {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}])
    assert out["messages"][1] == {"role": "assistant", "content": "No."}


def test_empty_text_is_dropped_and_an_empty_message_skipped() -> None:
    """Empty text (Anthropic rejects it) is dropped; an emptied assistant turn lets neighbours merge."""
    out = translate(
        [
            _user("a"),
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [_text(""), _text("b")]},
        ]
    )
    assert out["messages"] == [{"role": "user", "content": [_text("a"), _text("b")]}]


def test_final_assistant_message_is_kept_as_prefill() -> None:
    """A trailing assistant message is sent as Anthropic prefill."""
    out = translate([_user("Pick A or B"), _assistant("The answer is (")])
    assert out["messages"][-1] == {"role": "assistant", "content": "The answer is ("}


def test_conversation_starting_with_assistant_is_rejected() -> None:
    """Anthropic needs a user turn first; an assistant-first conversation is rejected, naming its index."""
    with pytest.raises(
        TranslationError, match=r"messages\[1\].*first non-system message must be from the user"
    ):
        translate([{"role": "system", "content": "s"}, _assistant("Hello!"), _user("Hi")])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "system", "content": "only a system prompt"}], "no user or assistant"),
        (["just a string"], r"messages\[0\] must be an object"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no role"),
        ([{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}], r"messages\[1\].*'critic'"),
        ([{"role": "user", "content": 42}], r"messages\[0\].*content.*int"),
        ([{"role": "user", "content": None}], r"messages\[0\].*content.*NoneType"),
        ([{"role": "user", "content": [{"type": "text", "text": 7}]}], r"messages\[0\].*text"),
        ([_user("a"), {"role": "assistant", "tool_calls": "c1"}], r"messages\[1\].*tool_calls"),
    ],
)
def test_malformed_messages_are_rejected_naming_the_index(messages: Any, match: str) -> None:
    """Missing/empty messages, a message without a role, or content of the wrong type name the problem."""
    body = {"model": "m", "messages": messages}
    with pytest.raises(TranslationError, match=match):
        chat_to_messages(body, model=MODEL, default_max_tokens=1)


# chat_to_messages: tools


def test_function_tools_become_anthropic_tools() -> None:
    """A function tool becomes {name, description, input_schema}; strict is dropped."""
    out = translate(tools=[WEATHER_TOOL])
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    assert "tool_choice" not in out


def test_tool_without_parameters_gets_an_empty_object_schema() -> None:
    """A tool with no parameters (or description) gets the empty object schema Anthropic requires."""
    out = translate(tools=[{"type": "function", "function": {"name": "now"}}])
    assert out["tools"] == [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]


@pytest.mark.parametrize(
    ("tool", "match"),
    [
        ({"type": "custom", "custom": {"name": "grammar"}}, r"tools\[0\]"),
        ({"type": "function", "function": {"description": "no name"}}, r"tools\[0\]"),
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}, "type 'object'"),
    ],
)
def test_tools_anthropic_cannot_take_are_rejected(tool: dict[str, Any], match: str) -> None:
    """Non-function tools, nameless tools and non-object parameter schemas are rejected."""
    with pytest.raises(TranslationError, match=match):
        translate(tools=[tool])


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_tool_choice_maps_to_anthropic(choice: Any, expected: dict[str, Any]) -> None:
    """tool_choice auto/required/none/named function maps to auto/any/none/tool."""
    assert translate(tools=[WEATHER_TOOL], tool_choice=choice)["tool_choice"] == expected


def test_unknown_tool_choice_is_rejected() -> None:
    """A tool_choice with no Anthropic equivalent (e.g. allowed_tools) is rejected."""
    with pytest.raises(TranslationError, match="tool_choice"):
        translate(tools=[WEATHER_TOOL], tool_choice={"type": "allowed_tools", "allowed_tools": {}})


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("none", {"type": "none"}),
    ],
)
def test_parallel_tool_calls_false_disables_parallel_use_except_on_none(
    choice: Any, expected: dict[str, Any]
) -> None:
    """parallel_tool_calls: false sets disable_parallel_tool_use on tool_choice, but never on none."""
    out = translate(tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False)
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


def test_parallel_tool_calls_true_changes_nothing() -> None:
    """parallel_tool_calls: true is Anthropic's default, so nothing is added."""
    assert "tool_choice" not in translate(tools=[WEATHER_TOOL], parallel_tool_calls=True)


def test_tool_settings_without_tools_are_dropped_unless_a_tool_is_demanded() -> None:
    """Without tools, auto/none tool_choice and parallel_tool_calls are dropped; required is rejected."""
    out = translate(tools=[], tool_choice="none", parallel_tool_calls=False)
    assert "tools" not in out and "tool_choice" not in out
    with pytest.raises(TranslationError, match="needs tools"):
        translate(tool_choice="required")


def test_reference_example_translates_to_a_valid_anthropic_body() -> None:
    """The reference's full Chat Completions example becomes the reference's Messages body."""
    out = translate(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call("call_1", "get_weather", '{"city":"Paris"}')],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
        ],
        max_completion_tokens=256,
        temperature=0.2,
        top_p=1,
        stop=["\n\n"],
        n=1,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        parallel_tool_calls=True,
        user="u-123",
        seed=1,
    )
    assert out == {
        "model": MODEL,
        "max_tokens": 256,
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C, cloudy"}],
            },
        ],
        "stop_sequences": ["\n\n"],
        "temperature": 0.2,
        "top_p": 1,
        "metadata": {"user_id": "u-123"},
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
            }
        ],
        "tool_choice": {"type": "auto"},
    }


# message_to_chat


def test_text_reply_becomes_a_chat_completion() -> None:
    """A text-only Message becomes a valid chat.completion with the msg id, model and created time."""
    completion = to_chat(anthropic_message([{"type": "text", "text": "Hello!"}]))
    assert completion.id == "chatcmpl-msg_01"
    assert completion.object == "chat.completion"
    assert completion.created == 1_711_475_054
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "stop", None)
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.message.refusal, choice.message.tool_calls) == (
        "Hello!",
        None,
        None,
    )


def test_text_blocks_are_concatenated_and_thinking_kept_beside_them() -> None:
    """Text blocks are concatenated in order; thinking blocks, which Chat has no field for, come back
    as the message's thinking_blocks (as sent, signatures included) and reasoning_content."""
    thinking = {"type": "thinking", "thinking": "Let me think.", "signature": "sig"}
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    message = anthropic_message(
        [thinking, {"type": "text", "text": "Paris "}, redacted, {"type": "text", "text": "is 18C."}]
    )
    assert to_chat(message).choices[0].message.content == "Paris is 18C."
    reply = message_to_chat(message, created=1)["choices"][0]["message"]
    assert reply["thinking_blocks"] == [thinking, redacted]
    assert reply["reasoning_content"] == "Let me think."


def test_tool_use_blocks_become_typed_tool_calls() -> None:
    """tool_use blocks become function tool_calls with JSON-string arguments; no text means null content."""
    message = anthropic_message(
        [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Lyon"}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        ],
        stop_reason="tool_use",
    )
    raw = message_to_chat(message, created=1)
    assert raw["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == json.dumps(
        {"city": "Lyon"}
    )
    choice = ChatCompletion.model_validate(raw).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("toolu_1", "get_weather", {"city": "Lyon"}),
        ("toolu_2", "now", {}),
    ]


def test_text_reply_has_no_tool_calls_key() -> None:
    """Without tool_use blocks the tool_calls key is omitted, not an empty list."""
    raw = message_to_chat(anthropic_message([{"type": "text", "text": "hi"}]), created=1)
    assert "tool_calls" not in raw["choices"][0]["message"]


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_stop_reason_maps_to_finish_reason(stop_reason: str | None, finish_reason: str) -> None:
    """Each Anthropic stop_reason maps to its OpenAI finish_reason per the reference table."""
    message = anthropic_message([{"type": "text", "text": "x"}], stop_reason=stop_reason)
    assert to_chat(message).choices[0].finish_reason == finish_reason


def test_unknown_stop_reason_maps_to_stop() -> None:
    """A stop_reason newer than this code falls back to stop."""
    message = anthropic_message([{"type": "text", "text": "x"}])
    message["stop_reason"] = "some_new_reason"
    assert to_chat(message).choices[0].finish_reason == "stop"


def test_usage_counts_cache_tokens_into_prompt_tokens() -> None:
    """prompt_tokens adds cache writes and reads to input; cached_tokens is the cache reads."""
    usage = {
        "input_tokens": 50,
        "output_tokens": 30,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 200,
    }
    completion = to_chat(anthropic_message([{"type": "text", "text": "x"}], usage=usage))
    assert completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (
        350,
        30,
        380,
    )
    details = completion.usage.prompt_tokens_details
    assert details is not None and (details.cached_tokens, details.cache_write_tokens) == (200, 100)
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


def test_request_model_is_used_only_when_the_message_names_none() -> None:
    """The Message's model wins; request_model fills in only when the Message lacks one."""
    message = anthropic_message([{"type": "text", "text": "x"}])
    assert to_chat(message, request_model="alias").model == MODEL
    del message["model"]
    assert to_chat(message, request_model="alias").model == "alias"


@pytest.mark.parametrize(
    "message",
    [
        {"id": "msg_1", "model": MODEL},
        {"id": "msg_1", "model": MODEL, "content": "text"},
        {"model": MODEL, "content": []},
        {"id": "msg_1", "content": []},
        {"id": "msg_1", "model": MODEL, "content": [{"type": "tool_use", "input": {}}]},
    ],
)
def test_unreadable_message_raises_value_error_not_translation_error(message: dict[str, Any]) -> None:
    """A reply we cannot read is the provider's fault: ValueError, never TranslationError."""
    with pytest.raises(ValueError) as info:
        message_to_chat(message, created=1)
    assert not isinstance(info.value, TranslationError)


# usage_from_message


def test_usage_from_message_reads_all_four_counts() -> None:
    """Input, output, cache-read and cache-write tokens come from their Anthropic fields."""
    usage = {
        "input_tokens": 5,
        "output_tokens": 6,
        "cache_read_input_tokens": 7,
        "cache_creation_input_tokens": 8,
    }
    message = anthropic_message([], usage=usage)
    assert usage_from_message(message) == Usage(5, 6, cache_read_tokens=7, cache_write_tokens=8)


def test_usage_from_message_treats_null_cache_counts_as_zero() -> None:
    """Null cache fields, as the SDK dumps them when absent, count as zero."""
    message = anthropic_message([])
    assert message["usage"]["cache_read_input_tokens"] is None
    assert usage_from_message(message) == Usage(50, 30)


def test_usage_from_message_without_usage_is_all_zero() -> None:
    """A message with no usage object yields zero counts rather than failing."""
    assert usage_from_message({"id": "msg_1"}) == Usage(0, 0)
    assert usage_from_message({"usage": None}) == Usage(0, 0)
