"""The command lines: `python -m server` (sinkserve) and `python -m scheduler.generate`.

Parsing and --help import nothing heavy, every option has a help that states its default once,
the options are grouped, a port in use is refused before the model loads, and --threads sets
torch's thread count."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from model.execution import threads as cpu_threads
from server import defaults
from server.__main__ import build_parser, listen_error, parse_args
from tests.conftest import REPO_ROOT

GROUPS = ("model", "device", "sampling defaults", "memory", "scheduling", "StreamingLLM", "sessions", "responses",
          "structured output", "server", "security", "logging")

# Parses a few command lines and prints --help in a fresh interpreter, then reports what that imported.
PARSE_SCRIPT = r"""
import contextlib, io, json, sys
import server.__main__ as cli
from scheduler import generate

cli.parse_args([])
cli.parse_args(["--port", "9000", "--threads", "1", "--api-key", "k", "--attention-window", "64",
                "--allowed-origins", "http://a", "--no-prefix-caching"])
generate.parse_args(["text", "--threads", "1"])
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.parse_args(["--help"])
parser = cli.build_parser()
actions = [{"options": a.option_strings, "help": a.help,
            "group": next(g.title for g in parser._action_groups if a in g._group_actions)}
           for a in parser._actions]
print(json.dumps({"modules": sorted(sys.modules), "help": out.getvalue(), "actions": actions}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}


@pytest.fixture(scope="module")
def parsed() -> dict:
    result = subprocess.run([sys.executable, "-c", PARSE_SCRIPT], capture_output=True, text=True, timeout=120,
                            env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _option_helps(help_text: str) -> dict[str, str]:
    """Each option's entry in --help (its first option string -> the entry on one line)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"  (--?[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {option: " ".join(entry.split()) for option, entry in entries.items()}


def test_parsing_and_help_import_nothing_heavy(parsed):
    modules = set(parsed["modules"])
    for heavy in ("torch", "numpy", "uvicorn", "fastapi", "starlette", "pydantic", "jinja2", "scheduler.engine",
                  "server.app", "server.serving", "model.checkpoints.loader"):
        assert heavy not in modules, heavy


def test_the_help_mentions_every_option_with_its_default_once(parsed):
    helps = _option_helps(parsed["help"])
    options = [action for action in parsed["actions"] if action["options"] != ["-h", "--help"]]
    assert len(options) >= 40
    for action in options:
        name = action["options"][0]
        assert action["help"], f"{name} has no help"
        assert name in helps, f"{name} is not in --help"
        entry = helps[name]
        assert "(default: None)" not in entry, entry
        assert entry.count("(default") == 1, entry
        assert entry.count("default:") == 1, entry


def test_the_options_are_grouped(parsed):
    for group in GROUPS:
        assert f"\n{group}:\n" in parsed["help"], group
    for action in parsed["actions"]:
        if action["options"] != ["-h", "--help"]:
            assert action["group"] in GROUPS, action


def test_the_defaults_are_the_documented_ones():
    args = vars(parse_args([]))
    assert args == {
        "model": None, "served_model_name": None, "load_format": "auto", "seed": 0, "tool_call_parser": "auto",
        "device": "auto", "dtype": "auto", "threads": cpu_threads.default_threads(), "attention_backend": None,
        "quantization": "auto", "quantization_group_size": 32, "smoothquant_alpha": 0.5, "no_smoothquant": False,
        "kv_cache_dtype": "auto", "generation_config": "auto", "override_generation_config": None,
        "default_max_tokens": None,
        "enforce_eager": False, "block_size": 16, "num_kv_blocks": None, "kv_cache_memory": 1.0,
        "gpu_memory_utilization": 0.9, "max_model_len": None, "no_prefix_caching": False, "max_num_seqs": 256,
        "max_num_batched_tokens": 2048, "max_waiting_requests": 1024, "request_timeout": None,
        "attention_sinks": 4, "attention_window": None, "max_output_tokens": 65536, "session_ttl": 600.0,
        "session_memory": 1.0, "response_store": None, "max_stored_responses": 10_000, "response_ttl": 86400.0,
        "response_store_memory": 1.0, "max_chain_tokens": 262_144, "grammar_compile_timeout": 3.0,
        "grammar_mask_timeout": 0.02, "grammar_cache_memory": 0.25, "host": "127.0.0.1", "port": 8000,
        "max_connections": 2048, "header_timeout": 30.0, "body_timeout": 60.0,
        "max_request_body_bytes": 16 * 2**20, "forwarded_allow_ips": None, "shutdown_timeout": 10.0,
        "api_key": None, "api_key_file": None, "rate_limit": None, "allowed_origins": None,
        "shared_prefix_cache": False, "log_level": "info", "log_format": "text"}


def test_the_moved_defaults_are_still_importable_from_their_modules():
    from server import app, connections, middleware, response_store, serving
    assert app.DEFAULT_MAX_BODY_BYTES is defaults.DEFAULT_MAX_BODY_BYTES
    assert connections.DEFAULT_MAX_CONNECTIONS is defaults.DEFAULT_MAX_CONNECTIONS
    assert connections.DEFAULT_HEADER_TIMEOUT is defaults.DEFAULT_HEADER_TIMEOUT
    assert middleware.DEFAULT_BODY_TIMEOUT is defaults.DEFAULT_BODY_TIMEOUT
    assert response_store.DEFAULT_MAX_STORED_RESPONSES is defaults.DEFAULT_MAX_STORED_RESPONSES
    assert response_store.DEFAULT_RESPONSE_TTL is defaults.DEFAULT_RESPONSE_TTL
    assert response_store.DEFAULT_RESPONSE_STORE_BYTES is defaults.DEFAULT_RESPONSE_STORE_BYTES
    assert response_store.DEFAULT_MAX_CHAIN_TOKENS is defaults.DEFAULT_MAX_CHAIN_TOKENS
    assert serving.DEFAULT_MAX_OUTPUT_TOKENS is defaults.DEFAULT_MAX_OUTPUT_TOKENS


def test_positive_options_refuse_zero():
    with pytest.raises(SystemExit):
        parse_args(["--max-connections", "0"])


def test_a_port_out_of_range_is_one_line_before_anything_loads(capsys):
    assert parse_args(["--port", "0"]).port == 0
    for bad in ("80000", "-1", "http"):
        with pytest.raises(SystemExit):
            parse_args(["--port", bad])
        assert "argument --port" in capsys.readouterr().err


def test_smoothquant_alpha_is_auto_or_a_fraction():
    assert parse_args(["--smoothquant-alpha", "auto"]).smoothquant_alpha == "auto"
    assert parse_args(["--smoothquant-alpha", "0.7"]).smoothquant_alpha == 0.7
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(SystemExit):
            parse_args(["--smoothquant-alpha", bad])


@pytest.mark.parametrize("cpus, cores, omp, threads", [
    (2, 2, None, 1),  # this kind of machine: one CPU left to the event loop and anything else
    (1, 1, None, 1),
    (16, 16, None, 15),
    (16, 8, None, 8),  # hyperthreads: one per physical core, as torch
    (8, None, None, 7),  # topology unknown
    (2, 2, "4", 4),  # OMP_NUM_THREADS, as torch takes it
    (2, 2, "junk", 1),
])
def test_default_threads(monkeypatch, cpus, cores, omp, threads):
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(cpu_threads, "physical_cores", lambda: cores)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert cpu_threads.default_threads() == threads


def test_the_threads_default_is_in_the_help():
    threads = cpu_threads.default_threads()
    assert threads >= 1
    assert f"(default: {threads}," in " ".join(build_parser().format_help().split())


def test_usable_cpus_counts_a_cgroup_quota(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu_threads, "CGROUP_V2_CPU_MAX", cpu_max)
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    cpu_max.write_text("max 100000\n")
    assert cpu_threads.usable_cpus() == 16
    cpu_max.write_text("250000 100000\n")  # docker --cpus=2.5
    assert cpu_threads.usable_cpus() == 3
    cpu_max.unlink()
    monkeypatch.setattr(cpu_threads, "CGROUP_V1_CPU", tmp_path)
    (tmp_path / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.usable_cpus() == 1
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_threads.usable_cpus() == 16


def _held_port() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_listen_error():
    with _held_port() as held:
        port = held.getsockname()[1]
        assert listen_error("127.0.0.1", port) == "address already in use"
    assert listen_error("127.0.0.1", 0) is None


def test_a_port_in_use_is_refused_before_the_model_loads():
    with _held_port() as held:
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--threads", "1"],
                                capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO_ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"sinkserve: error: cannot listen on 127.0.0.1:{port}: address already in use"], result.stderr
    assert "serving" not in result.stdout + result.stderr
    assert "KV pool" not in result.stdout + result.stderr


GENERATE_THREADS_SCRIPT = r"""
import torch
from scheduler import generate

initial = torch.get_num_threads()
counts = []
for argv in (["--threads", "0"], ["--threads", "2"], ["--threads", "1"]):
    generate.set_threads(generate.parse_args(argv).threads)
    counts.append(torch.get_num_threads())
print(initial, *counts)
"""


def test_generate_threads_sets_torchs_thread_count():
    result = subprocess.run([sys.executable, "-c", GENERATE_THREADS_SCRIPT], capture_output=True, text=True,
                            timeout=120, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    initial, zero, two, one = map(int, result.stdout.split())
    assert (zero, two, one) == (initial, 2, 1)  # 0: torch's own choice
    from scheduler import generate
    assert generate.parse_args([]).threads == cpu_threads.default_threads()


def test_generate_continues_a_base_model_and_says_why_it_stopped(capsys):
    """The bundled stories260K has no chat template: the prompt is continued, printed with it."""
    from scheduler import generate

    generate.main(["Once upon a time", "--max-tokens", "6", "--threads", "0"])
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")
    assert err.strip() == "[finish_reason: length, prompt tokens: 5, completion tokens: 6]"


MISSING_MODEL_SCRIPT = r"""
import sys
from server.__main__ import main
try:
    main(["--model", sys.argv[1], "--port", "0"])
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


def test_a_missing_model_is_one_line_before_torch_is_imported(tmp_path):
    result = subprocess.run([sys.executable, "-c", MISSING_MODEL_SCRIPT, "/no/such/model"], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"]
    from model.checkpoints.model_path import INSTALLED_MODELS

    assert result.stderr.strip().splitlines() == [
        f"sinkserve: error: no such file or directory: /no/such/model (installed model names: "
        f"{', '.join(INSTALLED_MODELS)})"]
    # A directory without weights too (the weight files are found without torch).
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-c", MISSING_MODEL_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr.strip().startswith(f"sinkserve: error: no weights in {tmp_path}: expected model.safetensors")
