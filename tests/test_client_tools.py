"""The load tester and the chat CLI without a server: fake clients, fake clocks, scripted input."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from clients import bench, chat

SECRET = "sk-do-not-write-me"


def chunk(text: str | None = None, role: str | None = None, finish_reason: str | None = None,
          endpoint: str = "chat") -> dict:
    if endpoint == "chat":
        delta = {**({"role": role} if role else {}), **({"content": text} if text is not None else {})}
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return {"choices": [{"index": 0, "text": text or "", "finish_reason": finish_reason}]}


class FakeStreams:
    """stream_chat and stream_completions that yield (arrival time, event) pairs, setting the clock
    to each arrival time; after the last event, the clock reads `done` ([DONE])."""

    def __init__(self, clock: list[float], timed_events: list[tuple[float, dict]], done: float):
        self.clock, self.timed_events, self.done = clock, timed_events, done

    async def stream_chat(self, **body):
        for at, event in self.timed_events:
            self.clock[0] = at
            yield event
        self.clock[0] = self.done

    stream_completions = stream_chat


def send_with_fake_clock(monkeypatch, endpoint: str, timed_events: list[tuple[float, dict]],
                         done: float) -> bench.RequestRecord:
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    args = bench.parse_args(["--endpoint", endpoint])
    spec = bench.RequestSpec(prompt=[1, 2, 3], prompt_len=3, output_len=3)
    return asyncio.run(bench.send(FakeStreams(clock, timed_events, done), spec, args, "fake", t0=0.0))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bench_ttft_is_the_first_generated_text(monkeypatch, endpoint):
    # The role-only chunk (chat) or an empty chunk (completions) comes long before any text.
    first = chunk("", role="assistant") if endpoint == "chat" else chunk("", endpoint=endpoint)
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    record = send_with_fake_clock(monkeypatch, endpoint, [
        (0.010, first), (0.500, chunk("Once", endpoint=endpoint)), (0.600, chunk(" upon", endpoint=endpoint)),
        (0.750, chunk("", finish_reason="length", endpoint=endpoint)), (0.760, usage)], done=0.800)
    assert record.success, record.error
    assert record.ttft == pytest.approx(0.500)
    assert record.itl == pytest.approx([0.100, 0.150])
    assert record.e2e == pytest.approx(0.800)
    assert (record.prompt_tokens, record.output_tokens) == (3, 3)


def test_bench_ttft_of_an_output_without_text_is_the_final_chunk(monkeypatch):
    record = send_with_fake_clock(monkeypatch, "chat", [
        (0.010, chunk("", role="assistant")), (0.300, chunk("", finish_reason="stop"))], done=0.310)
    assert record.success, record.error
    assert (record.ttft, record.itl, record.output_tokens) == (pytest.approx(0.300), [], 1)


def test_bench_result_json_leaves_out_secrets(monkeypatch, tmp_path, capsys):
    async def fake_run(args):
        assert args.api_key == SECRET  # the key is used, only not written
        record = bench.RequestRecord(prompt_tokens=16, output_tokens=8, success=True, ttft=0.05, e2e=0.4,
                                     itl=[0.05] * 7)
        return [record], 1.0, "fake-model"

    monkeypatch.setattr(bench, "run", fake_run)
    result = tmp_path / "result.json"
    argv = ["--url", "http://fake:1", "--api-key", SECRET, "--num-prompts", "3", "--max-concurrency", "2",
            "--ignore-eos", "--disable-tqdm", "--result-json", str(result)]
    bench.main(argv)
    text = result.read_text()
    assert SECRET not in text and SECRET not in capsys.readouterr().out
    saved = json.loads(text)
    assert set(saved["config"]) == set(vars(bench.parse_args(argv))) - set(bench.SECRET_ARGS)
    assert (saved["config"]["num_prompts"], saved["config"]["max_concurrency"]) == (3, 2)
    assert (saved["config"]["model"], saved["config"]["request_rate"]) == ("fake-model", "inf")
    assert saved["definitions"] == bench.DEFINITIONS and set(bench.DEFINITIONS) == set(bench.METRICS)


def records_with_outliers() -> list[bench.RequestRecord]:
    """300 requests with latencies of a few ms, and a few of seconds: under 1% of every metric."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(300):
        ttft = 1.0 if i == 0 else rng.uniform(0.010, 0.020)
        itl = list(rng.uniform(0.004, 0.006, 15)) + ([2.0] if i == 1 else [])
        records.append(bench.RequestRecord(prompt_tokens=16, output_tokens=len(itl) + 1, success=True,
                                           start=i * 0.01, ttft=ttft, e2e=ttft + sum(itl), itl=itl))
    return records


def test_bench_plot_clips_outliers_and_keeps_the_legend_off_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    records = records_with_outliers()
    summary = bench.summarize(records, duration=4.0)
    png = tmp_path / "bench.png"
    fig = bench.plot(records, summary, str(png))
    assert png.read_bytes().startswith(b"\x89PNG")
    values = bench.metric_values(records)
    for name in bench.METRICS:
        (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(f"{name.upper()} (")]
        ms = np.asarray(values[name]) * 1000
        p99, beyond = np.percentile(ms, 99), int((ms > np.percentile(ms, 99)).sum())
        assert 1 <= beyond and ms.max() > 10 * p99  # the data has outliers to clip
        low, high = ax.get_xlim()
        assert high <= p99 + 0.1 * (p99 - ms.min()), (name, high, p99)
        assert f"clipped at p99 = {p99:.2f} ms; {beyond} beyond" in ax.get_xlabel()
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_tightbbox()) for ax in fig.axes)  # the data, ticks and labels


class FakeChatClient:
    def __init__(self):
        self.requests: list[dict] = []

    def stream_chat(self, **request):
        self.requests.append({**request, "messages": list(request["messages"])})  # as sent, not as it grows
        yield chunk("", role="assistant")
        yield chunk("Hi there.", finish_reason="stop")


def test_chat_commands_stay_local(monkeypatch, capsys):
    lines = iter(["/help", "/nonsense now", "Hello!", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    client = FakeChatClient()
    assert chat.converse(client, chat.parse_args(["--max-tokens", "4"]), "tiny") == 0
    out, err = capsys.readouterr()
    banner, *rest = out.splitlines()
    assert banner.startswith(f"Chatting with tiny at {chat.DEFAULT_URL}.")
    assert all(command in banner for command in chat.COMMANDS)
    shown_help = rest[:len(chat.COMMANDS)]
    assert [line.split()[0] for line in shown_help] == list(chat.COMMANDS)
    assert "assistant> Hi there." in out and "(conversation reset)" in out
    (unknown,) = err.splitlines()
    assert "/nonsense" in unknown and all(command in unknown for command in chat.COMMANDS)
    assert client.requests == [{"max_tokens": 4, "model": "tiny", "messages": [{"role": "user", "content": "Hello!"}]}]
