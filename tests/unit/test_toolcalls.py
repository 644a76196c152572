"""Data stage 2 for tool-calling rows (distsft/data/toolcalls.py): every spelling (OpenAI tool_calls, the legacy
function_call, ShareGPT's function_call/observation with tools as a JSON string) maps to the same stored
conversation, and a bad row is refused in one line naming file, row and field."""

from __future__ import annotations

import json

import pytest

from distsft.config import DataConfig
from distsft.data.formats import to_conversation
from distsft.data.prepare import prepare
from distsft.data.sources import DataError
from tests.chat_families import TEMPLATES, family_tokenizer

WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
Q, RESULT, A = "Is it raining in Oslo?", "8 C, rain", "Yes: 8 C and rain in Oslo."
OPENAI = {"tools": [{"type": "function", "function": WEATHER}], "messages": [
    {"role": "user", "content": Q},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "content": RESULT},
    {"role": "assistant", "content": A}]}
LEGACY = {"functions": [WEATHER], "messages": [
    {"role": "user", "content": Q},
    {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
    {"role": "function", "name": "get_weather", "content": RESULT},
    {"role": "assistant", "content": A}]}
SHAREGPT = {"tools": json.dumps([WEATHER]), "conversations": [  # LLaMA-Factory's spelling
    {"from": "human", "value": Q},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
    {"from": "observation", "value": RESULT},
    {"from": "gpt", "value": A}]}


def stored(row: dict, fmt: str) -> dict:
    return to_conversation({**row, "_source": "d.jsonl", "_row": 1}, fmt)


def test_every_spelling_is_the_same_stored_conversation():
    want = stored(OPENAI, "messages")
    assert stored(LEGACY, "messages") == want and stored(SHAREGPT, "sharegpt") == want
    call, result = want["messages"][1], want["messages"][2]
    assert call["content"] == "" and json.loads(call["tool_calls"]) == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    # name from its call
    assert (result["role"], result["name"], result["tool_call_id"]) == ("tool", "get_weather", None)
    assert json.loads(want["tools"]) == [{"type": "function", "function": WEATHER}]
    plain = stored({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages")
    assert plain["tools"] is None and set(plain["messages"][0]) == set(call)  # one schema for every row


def test_parallel_calls_reasoning_spellings_and_ids():
    parallel = {"conversations": [
        {"from": "human", "value": "Weather in Oslo and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "8 C"}, {"from": "observation", "value": "11 C"},
        {"from": "gpt", "value": "Colder in Oslo."}], "system": "Be brief."}
    msgs = stored(parallel, "sharegpt")["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert len(json.loads(msgs[2]["tool_calls"])) == 2
    for key in ("reasoning_content", "thinking", "reasoning"):
        row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "why"}]}
        assert stored(row, "messages")["messages"][1]["reasoning_content"] == "why"
    by_id = {"messages": [  # results out of order, matched by id; the Llama spelling "parameters"
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "parameters": {"x": 1}}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": {"ok": True}},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "assistant", "content": "done"}]}
    msgs = stored(by_id, "messages")["messages"]
    assert [(m["name"], m["tool_call_id"], m["content"]) for m in msgs[2:4]] == [("g", "b", '{"ok": true}'),
                                                                                 ("f", "a", "1")]
    assert json.loads(msgs[1]["tool_calls"])[0]["function"]["arguments"] == {"x": 1}


def _turn(**kw):
    return {"role": "assistant", "content": None, **kw}


def _call(name="get_weather", args='{"city": "Oslo"}', **kw):
    return {"type": "function", "function": {**({"name": name} if name is not None else {}), "arguments": args}, **kw}


USER = {"role": "user", "content": Q}
BAD = [  # (row, the field the error names and what it says)
    ({"messages": [USER, _turn(tool_calls=[_call(name=None)])]},
     r"field 'messages\[1\].tool_calls\[0\].function.name' is missing"),
    ({"messages": [USER, _turn(tool_calls=[_call(args="{city: Oslo}")])]},
     r"field 'messages\[1\].tool_calls\[0\].function.arguments' is not valid JSON \(Expecting property name"),
    ({"messages": [USER, _turn(tool_calls=[_call(args="[1, 2]")])]},
     r"field 'messages\[1\].tool_calls\[0\].function.arguments' must be a JSON object, got list"),
    ({"messages": [USER, _turn(tool_calls=[_call(id="call_1")]), {"role": "tool", "tool_call_id": "call_9",
                                                                 "content": RESULT}]},
     r"field 'messages\[2\].tool_call_id' is 'call_9', which no earlier tool call awaiting a result has"),
    ({"messages": [USER, {"role": "tool", "content": RESULT}, {"role": "assistant", "content": A}]},
     r"field 'messages\[1\]' is a tool result without an earlier tool call to answer"),
    ({"messages": [USER, _turn(tool_calls=[_call()]), {"role": "tool", "content": RESULT},
                   {"role": "tool", "content": RESULT}]},  # by order: one call, two results
     r"field 'messages\[3\]' is a tool result without an earlier tool call to answer"),
    ({"conversations": [{"from": "human", "value": Q}, {"from": "function_call", "value": "get_weather(Oslo)"}]},
     r"field 'conversations\[1\].value' is not valid JSON"),
    ({"conversations": [{"from": "human", "value": Q}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     r"field 'conversations\[1\].value.name' is missing"),
    ({"tools": "[{'name': 'f'}]", "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
     r"field 'tools' is not valid JSON"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}], "messages": [USER, _turn(content=A)]},
     r"field 'tools\[0\].function.name' is missing"),
    ({"messages": [{**USER, "tool_calls": [_call()]}, _turn(content=A)]},
     r"field 'messages\[0\]' calls tools as 'user': only assistant turns call tools"),
]


@pytest.mark.parametrize("row,expect", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_tool_rows_are_named_by_file_row_and_field(tmp_path, tokenizer, row, expect):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, row, good]))
    with pytest.raises(DataError, match=rf"^{path} row 2: {expect}") as e:
        prepare(DataConfig(train_files=[str(path)], val_fraction=0, cache=False), tokenizer)
    assert "\n" not in str(e.value)


def test_plain_and_tool_files_mix_in_one_dataset(tmp_path, tokenizer):
    """Files of either kind concatenate (one stored schema) and dedup tells rows apart by their tools too."""
    plain, tools = tmp_path / "plain.jsonl", tmp_path / "tools.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]})
                     + "\n")
    other_tools = {**OPENAI, "tools": [{"type": "function", "function": {**WEATHER, "description": "Other."}}]}
    tools.write_text("".join(json.dumps(r) + "\n" for r in [OPENAI, OPENAI, other_tools]))
    tok = family_tokenizer(tokenizer, "qwen2.5")
    template = str(TEMPLATES / "qwen2.5.jinja")
    data = prepare(DataConfig(train_files=[str(plain), str(tools)], val_fraction=0, cache=False, dedup=True,
                              max_seq_len=4096, chat_template=template), tok)
    s = data.train_stats
    assert (s.rows_in, s.duplicates, s.kept, s.tool_rows) == (3, 1, 3, 2)


def test_nulls_that_arrow_fills_in_are_dropped_from_schemas_and_object_arguments():
    """Arrow gives a key that one row has and another lacks the value null; a JSON-string argument keeps its own."""
    row = {"tools": [{"type": "function", "function": {**WEATHER, "description": None}}], "messages": [
        USER, _turn(tool_calls=[_call(args={"city": "Oslo", "unit": None})]), {"role": "tool", "content": RESULT},
        _turn(tool_calls=[_call(args='{"city": "Oslo", "unit": null}')])]}
    out = stored(row, "messages")
    assert json.loads(out["tools"])[0]["function"] == {k: v for k, v in WEATHER.items() if k != "description"}
    assert [json.loads(m["tool_calls"])[0]["function"]["arguments"] for m in out["messages"][1::2]] == [
        {"city": "Oslo"}, {"city": "Oslo", "unit": None}]
