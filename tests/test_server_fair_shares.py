"""Fair shares between API keys, and continuations that share their chain's cache: each case
against a real server process (stories260K), figures printed with `pytest -s` (RELIABILITY.md).

- the response store evicts from the key holding the largest share, by bytes as well as count;
- under KV memory pressure, the key whose idle sessions hold the most blocks gives them up first,
  in the device pool and in the host tier;
- concurrent continuations of one response chain all reuse its cached history."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess

KEY_A, KEY_B = "sk-share-a", "sk-share-b"
# Some 80 tokens of stories260K's vocabulary, the same way each time.
HISTORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park " * 2
BYTES_PER_BLOCK = 20480  # stories260K: 5 layers x K and V x 16 slots x 4 KV heads x 8 dims x 4 bytes


def post(server, path: str, body: dict, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, headers={"Authorization": f"Bearer {key}"})


def test_the_response_store_evicts_the_key_with_the_largest_share_by_bytes():
    with ServerProcess("--api-key", KEY_A, "--api-key", KEY_B, "--response-store-memory", "0.002") as server:
        def respond(key: str, input_: list[dict]) -> str:
            response = post(server, "/v1/responses", {"input": input_, "max_output_tokens": 4, "truncation": "auto"},
                            key)
            assert response.status_code == 200, response.text
            return response.json()["id"]

        small = [respond(KEY_A, [{"role": "user", "content": f"Tell me story {i}"}]) for i in range(40)]
        # 20 responses of 150 KB each (the big message is stored, then truncated away for the prompt):
        # 3 MB, past the 2.1 MB store, while key A holds 40 small responses
        big = [respond(KEY_B, [{"role": "user", "content": f"{i} " + "word " * 30_000},
                               {"role": "user", "content": "hi"}]) for i in range(20)]

        def kept(key: str, ids: list[str]) -> int:
            return sum(httpx.get(f"{server.url}/v1/responses/{rid}", headers={"Authorization": f"Bearer {key}"}
                                 ).status_code == 200 for rid in ids)

        kept_small, kept_big = kept(KEY_A, small), kept(KEY_B, big)
    print(f"\nkey A: {kept_small} of 40 small responses kept; key B: {kept_big} of 20 responses of 150 KB kept")
    assert kept_small == 40
    assert 0 < kept_big < 20


def chat_turn(server, key: str, session: str, content: str) -> dict:
    response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                     "max_tokens": 4, "temperature": 0, "session_id": session}, key)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("blocks, host_blocks", [(64, 0), (32, 40)], ids=["device", "host-tier"])
def test_one_keys_sessions_do_not_push_out_another_keys(blocks, host_blocks):
    with ServerProcess("--api-key", KEY_A, "--api-key", KEY_B, "--num-kv-blocks", str(blocks),
                       "--session-memory", f"{host_blocks * BYTES_PER_BLOCK / 2**30:.9f}") as server:
        chat_turn(server, KEY_A, "a-1", HISTORY)
        # key B opens 80 sessions (device) or 12 long ones (host tier), far more than the pool holds
        opened = [chat_turn(server, KEY_B, f"b-{i}", f"{i} {HISTORY}" if not host_blocks else f"{i} {HISTORY * 5}")
                  for i in range(80 if not host_blocks else 12)]
        again = chat_turn(server, KEY_A, "a-1", HISTORY)
        swapped_out = server.metric("sinkserve_sessions_swapped_out_total")
        b_again = chat_turn(server, KEY_B, "b-0", f"0 {HISTORY}" if not host_blocks else f"0 {HISTORY * 5}")
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    print(f"\n{blocks} KV blocks, {host_blocks} host blocks: key A's session after key B opened {len(opened)}: "
          f"{cached} of {again['usage']['prompt_tokens']} prompt tokens cached ({swapped_out:.0f} sessions moved "
          f"to host memory); key B's oldest: {b_again['usage']['prompt_tokens_details']['cached_tokens']} cached")
    assert cached >= again["usage"]["prompt_tokens"] - 16
    assert b_again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # key B's own oldest went
    if host_blocks:
        assert swapped_out >= 2


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_concurrent_continuations_of_a_windowed_chain_reuse_its_history():
    # SINKSERVE_FORK_CHAIN_REPEATS=3300: a chain of some 250,000 tokens (RELIABILITY.md's figure)
    repeats = int(os.environ.get("SINKSERVE_FORK_CHAIN_REPEATS", "12"))
    with ServerProcess("--attention-window", "64", "--attention-sinks", "4", "--max-num-seqs", "16") as server:
        first = httpx.post(f"{server.url}/v1/responses", timeout=3600, json={
            "input": "Tell me a long story. " + HISTORY * repeats, "max_output_tokens": 8}).json()
        evictions = server.metric("sinkserve_sink_evictions_total")
        cpu_before, started = cpu_seconds(server.process.pid), time.perf_counter()
        results = [None] * 8

        def continue_chain(i: int):
            results[i] = httpx.post(f"{server.url}/v1/responses", timeout=3600, json={
                "input": f"And then? ({i})", "previous_response_id": first["id"], "max_output_tokens": 8}).json()

        threads = [threading.Thread(target=continue_chain, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds, cpu = time.perf_counter() - started, cpu_seconds(server.process.pid) - cpu_before
        prompt_tokens = server.metric("sinkserve_prompt_tokens_total")
        reused = server.metric("sinkserve_session_reused_tokens_total")
    usages = [r["usage"] for r in results]
    cached = [u["input_tokens_details"]["cached_tokens"] for u in usages]
    print(f"\n8 concurrent continuations of a {first['usage']['input_tokens']}-token windowed chain "
          f"({evictions:.0f} evictions): cached tokens {cached} of {usages[0]['input_tokens']}; "
          f"{reused:.0f} of {prompt_tokens:.0f} prompt tokens reused; the 8 took {seconds:.1f} s, {cpu:.1f} CPU-s")
    assert evictions > 0
    assert all(u["input_tokens"] - u["input_tokens_details"]["cached_tokens"] <= 32 for u in usages), usages
