"""The clients against the real server (a uvicorn subprocess): the sync and async client, the load
tester end to end, and the chat CLI driven through stdin."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest

from clients import bench
from clients.client import APIError, AsyncClient, Client, SSEDecoder
from tests.server_process import REPO_ROOT, ServerProcess, free_port

API_KEY = "test-key"
PROMPT = "Once upon a time"
STORY = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as proc:  # SIGTERM on exit, SIGKILL if it does not stop
        yield proc


@pytest.fixture(scope="module")
def keyed_server():
    with ServerProcess("--api-key", API_KEY) as proc:
        yield proc


def completion_text(events: list[dict]) -> str:
    return "".join(c["text"] for e in events for c in e["choices"])


def test_sync_client(server):
    with Client(server.url) as client:
        assert client.health()
        assert client.models()[0]["id"] == "stories260K"
        completion = client.completions(prompt=PROMPT, **GREEDY)
        assert completion["usage"]["completion_tokens"] == 8 and completion["choices"][0]["text"]
        chat = client.chat(messages=STORY, **GREEDY)
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] == 8
        assert "sinkserve_generation_tokens_total" in client.metrics()


def test_sync_streams_match_non_streamed(server):
    with Client(server.url) as client:
        expected = client.completions(prompt=PROMPT, **GREEDY)["choices"][0]["text"]
        events = list(client.stream_completions(prompt=PROMPT, stream_options={"include_usage": True}, **GREEDY))
        assert completion_text(events) == expected
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8

        expected = client.chat(messages=STORY, **GREEDY)["choices"][0]["message"]["content"]
        events = list(client.stream_chat(messages=STORY, **GREEDY))
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
        assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_errors_raise_api_error(server):
    with Client(server.url) as client:
        with pytest.raises(APIError) as info:
            client.completions(prompt=PROMPT, temperature=5.0)
        assert (info.value.status, info.value.param, info.value.type) == (400, "temperature", "invalid_request_error")
        with pytest.raises(APIError) as info:
            list(client.stream_completions(prompt=PROMPT, max_tokens=10_000))
        assert (info.value.status, info.value.code) == (400, "context_length_exceeded")
        with pytest.raises(APIError) as info:
            client.chat(messages=STORY, model="no-such-model")
        assert (info.value.status, info.value.param) == (404, "model")


def test_sse_decoder_error_event_and_cut_stream():
    decoder = SSEDecoder()
    lines = ['data: {"a": 1,', 'data:  "b": 2}', "", ": comment", "", 'data: {"error": {"message": "boom", '
             '"type": "internal_error", "param": null, "code": null}}', ""]
    events = []
    with pytest.raises(APIError) as info:
        for line in lines:
            events += decoder.feed(line)
    assert events == [{"a": 1, "b": 2}]
    assert (info.value.status, info.value.message, info.value.type) == (None, "boom", "internal_error")

    cut = SSEDecoder()
    assert list(cut.feed('data: {"x": 1}')) == []
    with pytest.raises(APIError, match="before data: \\[DONE\\]"):
        cut.finish()
    done = SSEDecoder()
    for line in ['data: {"x": 1}', "", "data: [DONE]"]:
        done.feed(line)
    assert done.finish() == [] and done.done


def test_async_client(server):
    async def main():
        async with AsyncClient(server.url) as client:
            assert await client.health()
            assert (await client.models())[0]["id"] == "stories260K"
            expected = (await client.completions(prompt=PROMPT, **GREEDY))["choices"][0]["text"]
            assert (await client.chat(messages=STORY, **GREEDY))["usage"]["completion_tokens"] == 8

            async def collect(stream) -> list[dict]:
                return [event async for event in stream]

            streams = await asyncio.gather(*(collect(client.stream_completions(prompt=PROMPT, **GREEDY))
                                             for _ in range(4)))
            assert all(completion_text(events) == expected for events in streams)
            chat_events = await collect(client.stream_chat(messages=STORY, **GREEDY))
            assert chat_events[-1]["choices"][0]["finish_reason"] == "length"
            with pytest.raises(APIError) as info:
                await collect(client.stream_chat(messages=STORY, top_logprobs=2))
            assert (info.value.status, info.value.param) == (400, "top_logprobs")
            assert "sinkserve_time_to_first_token_seconds" in await client.metrics()

    asyncio.run(main())


def test_api_key(keyed_server):
    with Client(keyed_server.url) as anonymous, Client(keyed_server.url, api_key="wrong") as wrong:
        assert anonymous.health()  # /health stays open
        for client in (anonymous, wrong):
            with pytest.raises(APIError) as info:
                client.models()
            assert (info.value.status, info.value.type) == (401, "authentication_error")
    with Client(keyed_server.url, api_key=API_KEY) as client:
        assert client.completions(prompt=PROMPT, **GREEDY)["usage"]["completion_tokens"] == 8

    async def main():
        async with AsyncClient(keyed_server.url, api_key=API_KEY) as client:
            return [event async for event in client.stream_chat(messages=STORY, **GREEDY)]

    assert asyncio.run(main())[-1]["choices"][0]["finish_reason"] == "length"


def test_bench_end_to_end(server, tmp_path, capsys):
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    result, png = tmp_path / "result.json", tmp_path / "bench.png"
    summary = bench.main(["--url", server.url, "--num-prompts", "16", "--input-len", "16", "--output-len", "8",
                          "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm", "--result-json", str(result),
                          *(["--plot", str(png)] if has_matplotlib else [])])
    assert (summary["completed"], summary["failed"]) == (16, 0), summary["errors"]
    assert summary["total_output_tokens"] == 16 * 8 and summary["total_input_tokens"] == 16 * 16
    for metric in bench.METRICS:
        assert 0 < summary[f"median_{metric}_ms"] <= summary[f"p90_{metric}_ms"] <= summary[f"p99_{metric}_ms"]
    assert re.search(r"Successful requests:\s+16\n", capsys.readouterr().out)
    saved = json.loads(result.read_text())
    assert saved["completed"] == 16 and saved["config"]["max_concurrency"] == 4
    assert [r["output_tokens"] for r in saved["requests"]] == [8] * 16
    assert all(len(r["itl"]) >= 1 for r in saved["requests"])
    if has_matplotlib:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_chat_endpoint(server):
    summary = bench.main(["--url", server.url, "--endpoint", "chat", "--num-prompts", "4", "--input-len", "12",
                          "--output-len", "6", "--range-ratio", "0.5", "--request-rate", "50", "--ignore-eos",
                          "--disable-tqdm"])
    assert (summary["completed"], summary["failed"]) == (4, 0), summary["errors"]
    assert 4 * 3 <= summary["total_output_tokens"] <= 4 * 9


def _default_sigint() -> None:
    # A test run started in the background (a shell without job control) ignores SIGINT, and a
    # child that inherits that never sees Ctrl-C: give the CLI the default, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_chat(server, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", "-m", "clients.chat", "--url", server.url, *args],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=_default_sigint)


def test_chat_cli_through_stdin(server):
    chat = run_chat(server, "--max-tokens", "16", "--temperature", "0", "--system", "You tell stories.",
                    "--session-id", "test-session")
    out, err = chat.communicate(b"Hello!\n/reset\nTell me about a cat.\n", timeout=60)
    out = out.decode()
    assert chat.returncode == 0, err.decode()
    assert out.startswith(f"Chatting with stories260K at {server.url}. Commands: /help"), out
    assert len(re.findall(r"assistant> \S", out)) == 2, out
    assert "(conversation reset)" in out


def test_the_clients_name_the_url_they_cannot_reach(capsys):
    """Nothing listens there: the chat CLI says so before the first line is typed, and the load
    tester before its first request, both naming the URL."""
    url = f"http://127.0.0.1:{free_port()}"
    chat = subprocess.run([sys.executable, "-m", "clients.chat", "--url", url], input=b"Hello!\n", cwd=REPO_ROOT,
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert chat.returncode == 1 and b"assistant>" not in chat.stdout
    assert chat.stderr.decode().startswith(f"error: cannot reach the server at {url}: "), chat.stderr
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--url", url, "--num-prompts", "1", "--disable-tqdm"])
    assert str(exit_.value).startswith(f"benchmark setup failed: cannot reach the server at {url}: ")


def test_the_bench_plot_says_what_was_run():
    pytest.importorskip("matplotlib")
    args = bench.parse_args(["--endpoint", "chat", "--max-concurrency", "4", "--input-len", "32", "--output-len",
                             "16", "--num-prompts", "3"])
    records = [bench.RequestRecord(32, 16, True, start=0.1 * i, ttft=0.05 + 0.01 * i, e2e=0.5 + 0.1 * i,
                                   itl=[0.03] * 15) for i in range(3)]
    summary = bench.summarize(records, 1.0)
    figure = bench.plot(records, summary, os.devnull, bench.run_title(args, "smollm2"))
    title = figure._suptitle.get_text()
    assert title.startswith("smollm2 · /v1/chat/completions · all at once, at most 4 in flight · "
                            "32 prompt / 16 output tokens\n3 requests (0 failed)"), title
    for ax in figure.axes:
        if ax.get_ylabel() == "requests":  # counts of 3 requests: whole numbers only
            assert all(float(tick).is_integer() for tick in ax.get_yticks()), ax.get_yticks()


def test_chat_cli_ctrl_c_stops_only_the_reply(server):
    chat = run_chat(server, "--max-tokens", "480", "--temperature", "1")
    try:
        chat.stdin.write(b"Tell me a long story.\n")
        chat.stdin.flush()
        shown, deadline = b"", time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            selector.register(chat.stdout, selectors.EVENT_READ)
            # Interrupt once the reply has visibly started streaming.
            while not re.search(rb"assistant> .{10}", shown, re.S) and time.monotonic() < deadline:
                if selector.select(timeout=1.0):
                    shown += os.read(chat.stdout.fileno(), 4096)
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(b"/quit\n", timeout=60)
    finally:
        chat.kill()
    assert chat.returncode == 0, err.decode()
    assert "(reply stopped)" in (shown + out).decode(), (shown + out).decode()


def test_bench_help_gives_every_default(capsys):
    """Every option of the load tester that takes a value says its default in --help."""
    from clients import bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1].split("metrics:", 1)[0])
    valued = [o for o in options if re.match(r"--[\w-]+ [A-Z_{]", o)]
    assert len(valued) >= 14
    for option in valued:
        assert "(default:" in " ".join(option.split()), option
