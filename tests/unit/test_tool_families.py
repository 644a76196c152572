"""Tool-calling rows under the families' own templates (tests/assets/templates/): each supervises exactly
the assistant turns, calls included, never the tool results; a template that cannot render tools is refused
naming the template and the row. The fixture is tests/assets/data/tool_calls.jsonl: parallel calls, a call
followed by a reply, a reasoning trace on the final reply, reasoning before a call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distsft.config import DataConfig
from distsft.data.chatview import view
from distsft.data.formats import to_conversation
from distsft.data.multiturn import split_per_turn
from distsft.data.prepare import prepare
from distsft.data.sources import DataError
from distsft.data.tokenize import IGNORE, TemplateError, encode_conversations
from tests.chat_families import TEMPLATES, family_tokenizer
from tests.unit.test_multiturn import supervised_runs

FIXTURE = Path(__file__).resolve().parents[1] / "assets" / "data" / "tool_calls.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
STORED = [to_conversation({**r, "_source": str(FIXTURE), "_row": n}, "messages") for n, r in enumerate(ROWS, 1)]
CALLS = {  # (name, city) of each row's calls, in order
    1: [("get_weather", "Paris"), ("get_time", "Paris")], 2: [("get_weather", "Oslo")],
    3: [("get_weather", "Rome")], 4: [("get_time", "Tokyo")]}
REPLY = {1: "It is 22 C and sunny in Paris, and the time is 14:05.", 2: "Yes: 8 C and rain in Oslo.",
         3: "Yes, take a coat: 11 C and windy in Rome.", 4: "It is 22:10 in Tokyo."}
THINK3, THINK4 = "<think>\n11 C with wind feels cold.\n</think>\n\n", "<think>\nI need the time tool.\n</think>\n\n"


def qwen_calls(row: int, sep: str) -> str:
    return sep.join(f'<tool_call>\n{{"name": "{n}", "arguments": {{"city": "{c}"}}}}\n</tool_call>'
                    for n, c in CALLS[row])


def mistral_calls(row: int) -> str:
    ids = {1: ["call00001", "call00002"], 2: ["call00003"], 3: ["call00004"], 4: ["call00005"]}[row]
    return "[TOOL_CALLS][" + ", ".join(f'{{"name": "{n}", "arguments": {{"city": "{c}"}}, "id": "{i}"}}'
                                       for (n, c), i in zip(CALLS[row], ids)) + "]</s>"


# family -> template file, and per row: the supervised runs (the assistant turns, calls included), or the
# refusal; written from the families' published formats, not from distsft's code
EXPECT = {
    "qwen2.5": ("qwen2.5.jinja", {
        1: [qwen_calls(1, "\n") + "<|im_end|>", REPLY[1] + "<|im_end|>"],
        2: [qwen_calls(2, "") + "<|im_end|>", REPLY[2] + "<|im_end|>"],
        3: [qwen_calls(3, "") + "<|im_end|>", THINK3 + REPLY[3] + "<|im_end|>"],  # reasoning written into the reply
        4: [THINK4 + "\n" + qwen_calls(4, "") + "<|im_end|>", REPLY[4] + "<|im_end|>"]}),
    "qwen3": ("qwen3.jinja", {  # the turn after the last user query that ends it gets a <think> block
        1: [qwen_calls(1, "\n") + "<|im_end|>", "<think>\n\n</think>\n\n" + REPLY[1] + "<|im_end|>"],
        2: [qwen_calls(2, "") + "<|im_end|>", "<think>\n\n</think>\n\n" + REPLY[2] + "<|im_end|>"],
        3: [qwen_calls(3, "") + "<|im_end|>", THINK3 + REPLY[3] + "<|im_end|>"],
        4: [THINK4 + qwen_calls(4, "") + "<|im_end|>", "<think>\n\n</think>\n\n" + REPLY[4] + "<|im_end|>"]}),
    "llama3.1": ("llama3.1.jinja", {
        1: "This model only supports single tool-calls at once",
        2: ['{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>', REPLY[2] + "<|eot_id|>"],
        3: ['{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>', THINK3 + REPLY[3] + "<|eot_id|>"],
        4: "drops the text \\(reply or reasoning\\) of assistant turn 1, which also calls tools"}),
    "mistral_nemo": ("mistral_nemo.jinja", {
        1: [mistral_calls(1), REPLY[1] + "</s>"],
        2: [mistral_calls(2), REPLY[2] + "</s>"],
        3: [mistral_calls(3), THINK3 + REPLY[3] + "</s>"],
        4: "drops the text \\(reply or reasoning\\) of assistant turn 1, which also calls tools"}),
}
CASES = [(f, r) for f in EXPECT for r in range(1, len(ROWS) + 1)]


@pytest.fixture(scope="module")
def toks(tokenizer):
    return {name: family_tokenizer(tokenizer, name) for name in EXPECT}


def one_row(tmp_path, row: int) -> Path:
    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(ROWS[row - 1]) + "\n")
    return p


def prep(tok, path, **kw):
    cfg = DataConfig(train_files=[str(path)], val_fraction=0, cache=False, max_seq_len=4096, **kw)
    return prepare(cfg, tok, "the family tokenizer")


def runs_of(tok, store, i=0) -> list[str]:
    ids, labels = store.example(i)
    return supervised_runs(tok, ids, labels)


def check_mask(tok, ids, sup, expect: list[str]) -> None:
    """The supervised text is exactly the assistant turns (calls included), nothing else."""
    assert supervised_runs(tok, ids, np.where(sup, ids, IGNORE)) == expect


@pytest.mark.parametrize("family,row", CASES, ids=[f"{f}-row{r}" for f, r in CASES])
def test_each_family_supervises_exactly_the_assistant_turns(tmp_path, toks, family, row):
    tok, (file, want) = toks[family], EXPECT[family]
    path, template = one_row(tmp_path, row), str(TEMPLATES / file)
    if isinstance(want[row], str):  # this family's template cannot render this row: refused naming it
        with pytest.raises(TemplateError, match=rf"^{path} row 1: data.chat_template=.*{file}.* {want[row]}") as e:
            prep(tok, path, chat_template=template)
        assert "\n" not in str(e.value)
        return
    data = prep(tok, path, chat_template=template)
    assert runs_of(tok, data.train) == want[row]
    text = tok.decode(data.train.example(0)[0])
    assert all(m["content"] in text for m in ROWS[row - 1]["messages"] if m["role"] == "tool")  # shown, not trained


def test_negative_control_supervising_tool_results_fails_the_check(toks):
    """The check above has teeth: the same example with its tool results supervised does not pass it."""
    tok, template = toks["qwen2.5"], (TEMPLATES / "qwen2.5.jinja").read_text()
    (ids, sup), = encode_conversations(tok, [STORED[0]["messages"]], "assistant", template, tools=[STORED[0]["tools"]])
    check_mask(tok, ids, sup, EXPECT["qwen2.5"][1][1])
    text = tok.decode(ids)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids.tolist()
    leaky = sup.copy()
    for result in ("22 C, sunny", "14:05"):
        at = text.index(f"<tool_response>\n{result}")
        leaky |= np.array([s < at + len(result) + 16 and e > at for s, e in enc["offset_mapping"]])
    with pytest.raises(AssertionError):
        check_mask(tok, ids, leaky, EXPECT["qwen2.5"][1][1])


@pytest.mark.parametrize("template,why", [
    ("mistral_v7.jinja", (r"cannot render this tool-calling conversation \(TemplateError: Only user, system and "
                          r"assistant roles are supported!\): leave such rows out, "
                          r"or use a template that renders them$")),
    ("chatml", (r"cannot render tools: the row's tool 'get_weather' is nowhere in its rendering; use a template that "
                r"renders them \(the model family's own: data.chat_template=null, or its .jinja file\)$")),
])
def test_a_template_that_cannot_render_tools_is_refused_naming_the_first_row(tmp_path, tokenizer, template, why):
    tok = family_tokenizer(tokenizer, "mistral_v7")
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [plain, plain, ROWS[1], ROWS[0]]))
    name = template if template == "chatml" else str(TEMPLATES / template)
    with pytest.raises(TemplateError, match=rf"^{path} row 3: data.chat_template={name} {why}") as e:
        prep(tok, path, chat_template=name)
    assert "\n" not in str(e.value)


def test_a_template_that_renders_no_call_is_refused(tokenizer):
    """Tools shown, calls not (the template reads only content): the call's turn names what is missing."""
    template = ("{% for t in tools or [] %}{{ t.function.name }}\n{% endfor %}{% for m in messages %}<|im_start|>"
                "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                "assistant\n{% endif %}")
    with pytest.raises(TemplateError, match=r"^d.jsonl row 2: the chat template cannot render tool calls: assistant "
                                            r"turn 1's tool call 'get_weather' is not in its rendering"):
        encode_conversations(tokenizer, [STORED[1]["messages"]], "assistant", template,
                             where=lambda k: "d.jsonl row 2", tools=[STORED[1]["tools"]])


def test_a_template_with_generation_markers_gets_the_same_mask_as_its_markers(tokenizer):
    """Templates with {% generation %} keep working for tool rows: the mask from rendered prefixes equals the
    one the template's own markers give (apply_chat_template's assistant_masks)."""
    template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
        "{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
        "<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = family_tokenizer(tokenizer, "qwen2.5")
    encoded = encode_conversations(tok, [r["messages"] for r in STORED], "assistant", template,
                                   tools=[r["tools"] for r in STORED])
    for (ids, sup), row in zip(encoded, STORED):
        msgs = view(row["messages"], "content")  # what the template is given: calls decoded, reasoning in the reply
        own = tok.apply_chat_template(msgs, tools=json.loads(row["tools"]), chat_template=template, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert own["input_ids"] == ids.tolist()
        want = np.array(own["assistant_masks"], bool)
        want[0] = False
        assert (sup == want).all()


def test_per_turn_renders_each_turn_with_the_rows_tools(tmp_path, toks):
    tok, template = toks["qwen3"], str(TEMPLATES / "qwen3.jinja")
    data = prep(tok, one_row(tmp_path, 4), chat_template=template, multiturn="per_turn")
    assert [runs_of(tok, data.train, i) for i in range(len(data.train))] == [
        [THINK4 + qwen_calls(4, "") + "<|im_end|>"], ["<think>\n\n</think>\n\n" + REPLY[4] + "<|im_end|>"]]
    assert all('"name": "get_time"' in tok.decode(data.train.example(i)[0]) for i in range(2))  # the tools, each time
    split, origin = split_per_turn([ROWS[3]["messages"]])
    assert origin == [0, 0] and [len(c) for c in split] == [2, 4]


def test_tool_rows_are_counted_and_a_bad_one_is_skipped_with_its_field(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS[1:3], bad]))
    tok = family_tokenizer(tokenizer, "qwen2.5")
    template = str(TEMPLATES / "qwen2.5.jinja")
    data = prep(tok, path, chat_template=template, bad_rows="skip")
    assert (data.train_stats.tool_rows, data.train_stats.reasoning_turns, data.train_stats.kept) == (2, 1, 2)
    assert (data.skipped.rows[0]["message"]
            == f"{path} row 3: field 'messages[1].tool_calls[0].function.name' is missing")
    with pytest.raises(DataError, match=r"row 3: field 'messages\[1\].tool_calls\[0\].function.name' is missing"):
        prep(tok, path, chat_template=template)
