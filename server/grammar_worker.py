"""A grammar sandbox: a process that tries grammars the way the engine will compile them.

Run by server/grammar_compiler.py (`python -m server.grammar_worker`), never by hand. It imports
llguidance and nothing heavier. Each grammar is compiled, its first mask computed, a copy made
and its first mask computed too, and all of it freed, in a thread whose stack is a fraction of
the server's threads' (TRIAL_STACK_BYTES against server.defaults.SERVER_THREAD_STACK_BYTES),
under an address-space limit: a grammar that overflows the stack here (a deep rule chain:
llguidance's compiler recurses) kills this process, not the server, and one that passes here
has several times the room in the server. The parent kills the process when a trial outruns
its deadline.

Protocol, on stdin and stdout: frames of a 4-byte big-endian length and a payload. First the
parent sends the vocabulary and limits (a pickle: the parent is trusted), and this process
answers {"ready": true} once its tokenizer is built; then each request is JSON
{"id": n, "grammar": text} and each answer JSON {"id": n, "error": text or null, "seconds":
compile and first masks, "bytes": what the compiled grammar holds}. Answers are JSON, never pickles, so that a
process a hostile grammar corrupted cannot make the server run code.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import resource
import signal
import struct
import sys
import threading
import time
from typing import BinaryIO

import llguidance

from scheduler.grammar_vocab import GrammarVocab

# The stack of the thread that runs a trial: llguidance's compiler recursed about 13 KiB per
# level of a chain of nested object schemas, so 2 MiB takes some 150 levels, and the server's
# 16 MiB threads eight times as many.
TRIAL_STACK_BYTES = 2 * 2**20
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def read_frame(stream: BinaryIO) -> bytes | None:
    """One frame's payload; None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(struct.pack(">I", len(payload)) + payload)
    stream.flush()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _allocated_bytes():
    """A function giving the bytes malloc has handed out and not taken back (glibc's mallinfo2;
    llguidance allocates through malloc), or None where there is no mallinfo2."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def allocated() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return allocated


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Trial:
    """Compiles grammars with one tokenizer and one set of limits."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, limits: dict):
        self.tokenizer = tokenizer
        self.limits = limits
        self.allocated = _allocated_bytes()

    def run(self, grammar: str) -> dict:
        before = self.allocated() if self.allocated else 0
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**self.limits))
        if not matcher.is_error():
            matcher.compute_bitmask()
        error = matcher.get_error() if matcher.is_error() else None
        if error is None:  # what the engine does with it next: a copy per request, its first mask
            copy = matcher.deep_copy()
            copy.compute_bitmask()
            error = copy.get_error() if copy.is_error() else None
            del copy
        seconds = time.perf_counter() - start
        size = (self.allocated() - before) if self.allocated else 0
        del matcher
        return {"error": error, "seconds": seconds, "bytes": max(size, 0)}


def _die_with_the_server() -> None:
    """Linux: be killed when the server process ends, even in the middle of a trial."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipes' end stops it after its trial
        pass


def main() -> None:
    _die_with_the_server()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries frames only
    init = read_frame(stdin)
    if init is None:
        return
    setup = pickle.loads(init)
    vocab = GrammarVocab(**setup["vocab"])
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=setup["n_vocab"],
                                       eos_token=setup["eos_token_ids"] or None)
    trial = Trial(tokenizer, setup["limits"])
    if setup.get("memory_bytes"):
        limit = _address_space_bytes() + setup["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    threading.stack_size(setup.get("stack_bytes", TRIAL_STACK_BYTES))
    write_frame(stdout, json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while (frame := read_frame(stdin)) is not None:
        request = json.loads(frame)
        grammar = request["grammar"]
        answer: dict = {"id": request["id"]}

        def run() -> None:
            try:
                answer.update(trial.run(grammar))
            except Exception as exc:  # noqa: BLE001 (llguidance raises plain exceptions for bad input)
                answer.update(error=str(exc) or type(exc).__name__, seconds=0.0, bytes=0)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        write_frame(stdout, json.dumps(answer).encode())


if __name__ == "__main__":
    main()
