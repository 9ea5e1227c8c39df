"""`EngineRequest`: a request as the engine takes it, checked and resolved once.

The input processor (scheduler/input_processor.py) builds it from a prompt and the API's
options; the engine trusts every field. It is plain data: nothing in it is a live object of the
engine, so it can cross a process boundary (a compiled grammar is llguidance's serialized form).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.sampling_params import SamplingParams
from scheduler.sink_policy import SinkPolicy


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink_policy: SinkPolicy | None = None  # None: dense attention within the context
    session_id: str | None = None  # keeps its cache for the session's next request (sessions.py)
    cache_salt: str | None = None  # shares prefix-cache blocks only with requests of the same salt
    tenant: str | None = None  # the API key whose share of idle-session memory its session counts in
    deadline: float | None = None  # time.monotonic() at which it ends with finish reason "timeout"
    compiled_grammar: object | None = None  # params.grammar compiled already (StructuredOutput.compile)
