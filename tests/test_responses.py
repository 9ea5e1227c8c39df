"""OpenAI's Responses API (/v1/responses) through the real server and the official openai
client: response chains run as sessions, stored responses are bounded and kept per API key."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from pydantic import TypeAdapter

from scheduler.engine_request import EngineRequest
from server.async_engine import RequestFailedError
from server.metrics import Metrics
from server.response_store import Chain, MemoryResponseStore, ResponseStore, StoredResponse
from server.responses import _stream, _Turn
from server.responses_protocol import ResponseRequest
from server.serving import Job
from tests.server_process import ServerProcess, wait_for

openai = pytest.importorskip("openai")
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent  # noqa: E402

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)

KEY_A, KEY_B = "key-a", "key-b"
MAX_MODEL_LEN = 256
MAX_STORED = 24
ARGS = ("--api-key", KEY_A, "--api-key", KEY_B, "--max-model-len", str(MAX_MODEL_LEN), "--attention-sinks", "4",
        "--attention-window", "124", "--num-kv-blocks", "128", "--max-stored-responses", str(MAX_STORED),
        "--max-chain-tokens", "4096")
DENSE = {"attention_window": 0}  # a request without the server's StreamingLLM window
PARK = "Lily and Ben played in the park. "  # 12 tokens


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0)


@pytest.fixture(scope="module")
def client_b(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_B, max_retries=0)


def _post(server, body: dict, key: str = KEY_A) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120)


def test_a_response_and_its_stream_parse_into_the_sdk_types(client):
    # Greedy, this reply ends by itself (EOS) well inside the context.
    kwargs = dict(model="stories260K", input="Tell me about Lily.", temperature=0, extra_body=DENSE,
                  metadata={"topic": "lily"}, user="u-1")
    response = client.responses.create(**kwargs)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.incomplete_details is None and response.error is None
    assert response.model == "stories260K" and response.store is True and response.metadata == {"topic": "lily"}
    assert response.tools == [] and response.tool_choice == "auto" and response.text.format.type == "text"
    message = response.output[0]
    assert len(response.output) == 1 and message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.output_text and response.output_text == message.content[0].text
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0 and usage.input_tokens_details.cached_tokens >= 0

    events = list(client.responses.create(stream=True, store=False, **kwargs))
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == response.output_text == events[-4].text
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text and final.store is False
    assert final.usage.output_tokens == usage.output_tokens and final.id == events[0].response.id
    assert events[0].response.status == "in_progress" and events[0].response.output == []

    with client.responses.stream(**kwargs) as stream:
        assert stream.get_final_response().output_text == response.output_text

    # Cut at max_output_tokens: incomplete, streamed or not.
    short = client.responses.create(model="stories260K", input="Tell me about Lily.", temperature=0,
                                    max_output_tokens=5)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 5 and short.output[0].status == "incomplete"
    streamed = list(client.responses.create(model="stories260K", input="Tell me about Lily.", temperature=0,
                                            max_output_tokens=5, stream=True))
    assert streamed[-1].type == "response.incomplete" and streamed[-1].response.output_text == short.output_text
    # As with OpenAI, which ends such a stream with response.incomplete too, the SDK's helper
    # finds no response.completed: the incomplete response is its last event's (README).
    with client.responses.stream(model="stories260K", input="Tell me about Lily.", temperature=0,
                                 max_output_tokens=5) as stream:
        events = list(stream)
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == short.output_text


def _sse_events(server, body: dict) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_every_field_the_sdk_requires_is_there_and_typed_right(server):
    """The SDK builds its objects without validating them; pydantic validation of the raw JSON
    against the SDK's types checks every required field and type."""
    body = {"input": "Tell me about Lily.", "max_output_tokens": 6, "metadata": {"a": "b"}}
    raw = _post(server, body).json()
    Response.model_validate(raw)
    got = httpx.get(f"{server.url}/v1/responses/{raw['id']}", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert Response.model_validate(got) == Response.model_validate(raw)
    events = _sse_events(server, body)
    for kind, data in events:
        assert STREAM_EVENT.validate_python(data).type == kind
    items = httpx.get(f"{server.url}/v1/responses/{raw['id']}/input_items",
                      headers={"Authorization": f"Bearer {KEY_A}"}).json()
    assert ResponseItemList.model_validate(items).data[0].content[0].text == "Tell me about Lily."


def test_an_engine_error_mid_stream_ends_it_with_error_and_response_failed():
    class FailingEngine:
        async def generate(self, *args, **kwargs):
            yield []
            raise RequestFailedError("The server had an error while generating this request.")

    state = SimpleNamespace(engine=FailingEngine(), metrics=Metrics(lambda: None, "m"), model_name="m",
                            response_store=MemoryResponseStore())
    body = ResponseRequest(input="hi", store=False)
    turn = _Turn(body, "resp_1", "msg_1", 0, None, None, None, (("msg_0", "user", "hi"),), 1.0, 1.0)
    turn.job = Job("resp_1", {}, [EngineRequest("resp_1-0", [1, 2], SimpleNamespace(n=1))], streamed=True)

    async def run() -> list[str]:
        return [event async for event in _stream(state, turn)]

    events = [json.loads(event.split("data: ", 1)[1]) for event in asyncio.run(run())]
    assert [event["type"] for event in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "generation_failed"
    failed = STREAM_EVENT.validate_python(events[-1])
    assert failed.response.status == "failed" and failed.response.error.code == "server_error"


def test_a_chain_reuses_its_cache_and_answers_as_the_full_history_would(client):
    instructions = "You tell short stories."
    first = client.responses.create(model="stories260K", instructions=instructions,
                                    input="Tell me a story about a cat.", max_output_tokens=12, temperature=0,
                                    extra_body=DENSE)
    second = client.responses.create(model="stories260K", instructions=instructions, input="And then?",
                                     previous_response_id=first.id, max_output_tokens=12, temperature=0,
                                     extra_body=DENSE)
    assert second.previous_response_id == first.id
    # The first turn's prompt came from the chain's session (its reply was re-tokenized).
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    messages = [{"role": "system", "content": instructions},
                {"role": "user", "content": "Tell me a story about a cat."},
                {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And then?"}]
    fresh = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={**DENSE, "cache_salt": "fresh"})
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == second.output_text
    assert fresh.usage.prompt_tokens == second.usage.input_tokens

    # Instructions are not carried over: without them, the conversation has no system message.
    third = client.responses.create(model="stories260K", input=[{"role": "user", "content": "What next?"}],
                                    previous_response_id=second.id, max_output_tokens=8, temperature=0,
                                    extra_body=DENSE)
    assert third.instructions is None
    plain = messages[1:] + [{"role": "assistant", "content": second.output_text},
                            {"role": "user", "content": [{"type": "text", "text": "What next?"}]}]
    fresh = client.chat.completions.create(model="stories260K", messages=plain, max_tokens=8, temperature=0,
                                           extra_body={**DENSE, "cache_salt": "fresh"})
    assert fresh.usage.prompt_tokens == third.usage.input_tokens
    assert fresh.choices[0].message.content == third.output_text

    # The stored pieces: retrieve returns the response as created, input_items this turn's input.
    assert client.responses.retrieve(second.id).output_text == second.output_text
    assert client.responses.retrieve(second.id).instructions == instructions
    items = client.responses.input_items.list(second.id).data
    assert [(item.role, item.content[0].text) for item in items] == [("user", "And then?")]

    # A client may send earlier output items back as input (the chain without previous_response_id).
    resent = client.responses.create(
        model="stories260K", instructions=instructions, max_output_tokens=12, temperature=0, extra_body=DENSE,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story about a cat."}]},
               first.output[0].model_dump(exclude_none=True),
               {"type": "message", "role": "user", "content": "And then?"}])
    assert resent.output_text == second.output_text and resent.usage.input_tokens == second.usage.input_tokens


def test_a_chain_goes_past_the_context_under_the_window(server, client):
    previous, cached = None, []
    for turn in range(8):
        response = client.responses.create(model="stories260K", input=f"Tell me more, part {turn}.",
                                           previous_response_id=previous, max_output_tokens=40, temperature=0)
        assert response.status in ("completed", "incomplete")
        cached.append(response.usage.input_tokens_details.cached_tokens)
        previous = response.id
    assert response.usage.input_tokens > MAX_MODEL_LEN  # the conversation no longer fits the context
    assert all(count > 0 for count in cached[1:])  # every later turn found its chain's cache
    assert server.metric("sinkserve_sink_evictions_total") > 0
    # The same chain without a window: the usual 400.
    dense = _post(server, {"input": "And?", "previous_response_id": previous, **DENSE})
    assert dense.status_code == 400 and dense.json()["error"]["code"] == "context_length_exceeded"
    assert dense.json()["error"]["param"] == "input"


def test_truncation_auto_drops_the_oldest_messages_of_a_dense_request(server):
    first = _post(server, {"input": PARK * 12, "max_output_tokens": 4, **DENSE}).json()
    body = {"input": PARK * 12, "previous_response_id": first["id"], "max_output_tokens": 4, **DENSE}
    refused = _post(server, body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    truncated = _post(server, {**body, "truncation": "auto"})
    assert truncated.status_code == 200, truncated.text
    usage = truncated.json()["usage"]
    assert usage["input_tokens"] + 4 <= MAX_MODEL_LEN and truncated.json()["truncation"] == "auto"


def test_store_false_and_unknown_ids(server, client):
    kept = client.responses.create(model="stories260K", input="Hi", max_output_tokens=3)
    unstored = client.responses.create(model="stories260K", input="Hi", max_output_tokens=3, store=False,
                                       previous_response_id=kept.id)
    assert unstored.store is False and unstored.previous_response_id == kept.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="stories260K", input="Hi", previous_response_id=unstored.id)
    assert error.value.body["code"] == "previous_response_not_found"
    assert error.value.body["param"] == "previous_response_id"
    for bad_id in ("resp_unknown", "x" * 300):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(bad_id)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(bad_id)


def test_responses_are_visible_to_their_api_key_only(server, client, client_b):
    first = client.responses.create(model="stories260K", input="Tell me a story about a dog.", max_output_tokens=8,
                                    temperature=0)
    for call in (lambda: client_b.responses.retrieve(first.id), lambda: client_b.responses.delete(first.id),
                 lambda: client_b.responses.input_items.list(first.id),
                 lambda: client_b.responses.create(model="stories260K", input="And?", previous_response_id=first.id)):
        with pytest.raises(openai.NotFoundError) as error:
            call()
        assert first.id in error.value.body["message"]
    assert httpx.get(f"{server.url}/v1/responses/{first.id}").status_code == 401
    # A's response is intact, and its chain still finds its cache.
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model="stories260K", input="And?", previous_response_id=first.id,
                                     max_output_tokens=4)
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_deleting_the_head_ends_the_chains_session(server, client):
    first = client.responses.create(model="stories260K", input="Once upon a time", max_output_tokens=4)
    second = client.responses.create(model="stories260K", input="And?", previous_response_id=first.id,
                                     max_output_tokens=4)
    sessions = server.metric("sinkserve_sessions_active")
    assert client.responses.delete(second.id) is None
    assert server.metric("sinkserve_sessions_active") == sessions - 1
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    # The chain goes on from the first response: its history is prefilled again.
    third = client.responses.create(model="stories260K", input="And?", previous_response_id=first.id,
                                    max_output_tokens=4)
    assert third.usage.input_tokens == second.usage.input_tokens


def test_unsupported_parameters_are_refused_by_name(server):
    refused = {
        "tools": [{"type": "function", "name": "f", "parameters": {}}], "tool_choice": "required",
        "reasoning": {"effort": "high"}, "include": ["message.output_text.logprobs"], "background": True,
        "text": {"format": {"type": "json_object"}}, "top_logprobs": 2, "conversation": "conv_1",
        "prompt": {"id": "pmpt_1"}, "stream_options": {"include_obfuscation": True}, "seed": 1,
    }
    for name, value in refused.items():
        response = _post(server, {"input": "Hi", name: value})
        assert response.status_code == 400, name
        assert response.json()["error"]["param"] == name, response.text
    for content in ([{"type": "input_image", "image_url": "https://example.com/a.png"}],
                    [{"type": "input_file", "file_id": "file-1"}]):
        response = _post(server, {"input": [{"role": "user", "content": content}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "input"
        assert content[0]["type"] in response.json()["error"]["message"]
    response = _post(server, {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    # Accepted at the values that ask for nothing.
    accepted = {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "include": [], "background": False,
                "text": {"format": {"type": "text"}}, "reasoning": {"effort": None}, "service_tier": "auto"}
    response = _post(server, {"input": "Hi", "max_output_tokens": 2, **accepted})
    assert response.status_code == 200, response.text
    assert response.json()["tool_choice"] == "none" and response.json()["parallel_tool_calls"] is False
    assert httpx.get(f"{server.url}/v1/responses/{response.json()['id']}?stream=true",
                     headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 400


def test_bounds_metadata_chain_length_and_stored_responses(server, client):
    assert _post(server, {"input": "Hi", "max_output_tokens": 1,
                          "metadata": {f"k{i}": "v" for i in range(16)}}).status_code == 200
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}):
        response = _post(server, {"input": "Hi", "metadata": metadata})
        assert response.status_code == 400 and response.json()["error"]["param"] == "metadata"
    too_long = _post(server, {"input": PARK * 500, "max_output_tokens": 1})  # ~6,000 tokens, past 4,096
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "response_chain_too_long"
    # Past --max-stored-responses, the least recently used responses are forgotten first.
    ids = [client.responses.create(model="stories260K", input=f"Story {i}", max_output_tokens=1).id
           for i in range(MAX_STORED + 1)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[1]).id == ids[1]  # now the most recently used
    client.responses.create(model="stories260K", input="One more", max_output_tokens=1)
    assert client.responses.retrieve(ids[1]).id == ids[1]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[2])


def test_a_client_that_leaves_a_stream_frees_its_request(server):
    body = {"input": "Sam was sad.", "temperature": 0, "stream": True}  # greedy, this never ends by itself
    sessions = server.metric("sinkserve_sessions_active")
    events = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY_A}"},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                events.append(line[len("event: "):])
            if events.count("response.output_text.delta") == 3:
                break
    assert events[0] == "response.created"
    assert wait_for(lambda: server.metric("sinkserve_num_requests_running") == 0, timeout=30)
    # Nothing was stored, so the chain it began has nothing to continue from: no session is kept.
    assert wait_for(lambda: server.metric("sinkserve_sessions_active") == sessions, timeout=30)


# -- the store alone -------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _node(store: ResponseStore, response_id: str, parent: StoredResponse | None = None, tenant: str | None = "t",
          text: str = "reply") -> StoredResponse:
    chain = parent.chain if parent is not None else Chain(f"session-{response_id}")
    node = StoredResponse(response_id, tenant, chain, parent, (("msg_in", "user", "hi"),), None, text, "msg_out",
                          {"status": "completed"})
    return node


def test_the_store_forgets_least_recently_used_and_idle_responses_and_ends_their_sessions():
    clock = _Clock()
    store = MemoryResponseStore(max_responses=3, ttl=10.0, clock=clock)
    a = _node(store, "a")
    assert store.add(a) == []
    b = _node(store, "b", parent=a)
    c = _node(store, "c")
    store.add(b)
    store.add(c)
    assert store.get("a", "t")[0] is a and store.get("a", "other")[0] is None  # another tenant: unknown
    assert store.add(_node(store, "d")) == []  # b goes (a was used); chain a-b still has a
    assert store.get("b", "t")[0] is None
    assert store.add(_node(store, "e")) == ["session-c"]  # c was its chain's last response
    clock.now = 11.0
    node, ended = store.get("e", "t")
    assert node is None and sorted(ended) == ["session-a", "session-d", "session-e"]
    assert len(store) == 0 and store.num_bytes == 0 and store.num_alive == 0


def test_one_key_flooding_the_store_forgets_its_own_responses_first():
    store = MemoryResponseStore(max_responses=4)
    mine = _node(store, "mine", tenant="quiet")
    store.add(mine)
    for i in range(20):
        store.add(_node(store, f"flood-{i}", tenant="loud"))
    assert store.get("mine", "quiet")[0] is mine and len(store) == 4
    assert [store.get(f"flood-{i}", "loud")[0] is not None for i in range(17, 20)] == [True] * 3
    assert store.get("flood-16", "loud")[0] is None


def test_the_store_keeps_a_forgotten_responses_history_for_the_responses_that_continue_it():
    store = MemoryResponseStore(max_responses=10, max_bytes=10**9)
    a = _node(store, "a", text="x" * 10_000)
    store.add(a)
    b = _node(store, "b", parent=a)
    store.add(b)
    assert store.delete("a", "t") == (True, [])  # not the head, and b still needs its history
    assert store.get("a", "t")[0] is None and store.num_alive == 2
    assert b.conversation() == [("user", "hi"), ("assistant", "x" * 10_000), ("user", "hi"), ("assistant", "reply")]
    assert store.delete("b", "t") == (True, ["session-a"])
    assert store.num_alive == 0 and store.num_bytes == 0
    # A parent forgotten while its continuation ran is alive (and counted) again.
    c = _node(store, "c")
    store.add(c)
    store.delete("c", "t")
    store.add(_node(store, "d", parent=c))
    assert store.num_alive == 2 and store.num_bytes == c.size + store.get("d", "t")[0].size
    # The memory bound evicts too, never the response just added.
    small = MemoryResponseStore(max_responses=10, max_bytes=a.size + 1)
    small.add(_node(small, "p", text="x" * 10_000))
    small.add(_node(small, "q", text="x" * 10_000))
    assert small.get("p", "t")[0] is None and small.get("q", "t")[0] is not None
