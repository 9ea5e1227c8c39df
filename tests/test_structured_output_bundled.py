"""Constrained decoding on the bundled stories260K (a SentencePiece tokenizer, where a grammar's
forced text must not pick up the tokenizer's space prefix), and how the engine survives a
grammar that fails while it runs."""

from __future__ import annotations

import json

import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from scheduler.structured_output import GrammarError, choice_grammar, json_schema_grammar, regex_grammar
from server.chat_template import ChatTemplate, ToolsNotRenderedError


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(None, device="cpu", num_kv_blocks=128)


def _run(engine: Engine, requests: dict[str, SamplingParams]) -> dict[str, tuple[str, str]]:
    prompt = engine.tokenizer.encode("Once upon a time")
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    texts = {request_id: ["", None] for request_id in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id][0] += out.text
            if out.finished:
                texts[out.request_id][1] = out.finish_reason
    return {request_id: tuple(result) for request_id, result in texts.items()}


def test_grammars_hold_on_a_sentencepiece_tokenizer(engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    out = _run(engine, {
        "json": SamplingParams(temperature=0, max_tokens=30, grammar=json_schema_grammar(schema)),
        "any": SamplingParams(temperature=0, max_tokens=30, grammar=json_schema_grammar(True)),
        "regex": SamplingParams(temperature=0, max_tokens=30, grammar=regex_grammar("hello world")),
        "choice": SamplingParams(temperature=0, max_tokens=30, grammar=choice_grammar(["yes", "no"])),
        "free": SamplingParams(temperature=0, max_tokens=8),
    })
    assert out["json"][1] == "stop" and set(json.loads(out["json"][0])) == {"a"}
    assert out["regex"] == ("hello world", "stop") and out["choice"][0] in ("yes", "no")
    assert out["any"][1] in ("stop", "length") and out["free"][1] == "length"


def test_a_mask_that_fails_fails_its_step_not_the_engine(engine, monkeypatch):
    structured = engine.structured_output
    start = structured.start_masks

    def failing(request_ids):
        masks = start(request_ids)
        if masks is not None:
            masks.done = structured._worker.submit(_raise)
        return masks

    monkeypatch.setattr(structured, "start_masks", failing)
    out = _run(engine, {"bad": SamplingParams(temperature=0, max_tokens=5, grammar=regex_grammar("[a-z ]+")),
                        "good": SamplingParams(temperature=0, max_tokens=5)})
    assert out["bad"][1] == "error" and out["good"][1] == "length"  # fault isolation ran
    monkeypatch.undo()
    assert _run(engine, {"after": SamplingParams(temperature=0, max_tokens=3, grammar=choice_grammar(["ok"]))}) == {
        "after": ("ok", "stop")}


def _raise():
    raise RuntimeError("injected mask failure")


def test_grammars_are_cached_per_salt_and_bad_ones_are_refused(engine):
    grammar = choice_grammar(["a", "b"])
    structured = engine.structured_output
    assert structured.compile(grammar, "key-a") is structured.compile(grammar, "key-a")
    assert structured.compile(grammar, "key-a") is not structured.compile(grammar, "key-b")
    with pytest.raises(GrammarError, match="false"):
        json_schema_grammar(False)
    with pytest.raises(GrammarError):
        structured.compile(regex_grammar("(unclosed"))


def test_a_template_that_ignores_tools_refuses_them(engine):
    tools = [{"type": "function", "function": {"name": "f"}}]
    plain = ChatTemplate(engine.tokenizer, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert plain.render([{"role": "user", "content": "x"}]) == "[x]"
    with pytest.raises(ToolsNotRenderedError):
        plain.render([{"role": "user", "content": "x"}], tools=tools)
