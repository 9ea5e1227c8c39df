"""A small sync and async client for the OpenAI-compatible API (and sinkserve's extras).

    with Client("http://127.0.0.1:8000") as client:
        print(client.completions(prompt="Once upon a time", max_tokens=32)["choices"][0]["text"])
        for event in client.stream_chat(messages=[{"role": "user", "content": "Hi"}]):
            print(event["choices"][0]["delta"].get("content", ""), end="")

Request bodies are passed through as keyword arguments, exactly as the wire format spells them.
Streams yield each server-sent event as a dict and stop at `data: [DONE]`. An error response,
or an error event inside a stream, raises APIError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # seconds; a long generation streams for a while


class APIError(Exception):
    """An error from the server in OpenAI's shape; `status` is None for an error event that
    arrived inside a stream (after the 200 response had started)."""

    def __init__(self, status: int | None, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        where = f"HTTP {status}" if status is not None else "stream error"
        super().__init__(f"{where} ({type or 'error'}{f', param {param}' if param else ''}): {message}")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_body(cls, status: int | None, body: dict) -> "APIError":
        error = body.get("error")
        if not isinstance(error, dict):
            return cls(status, json.dumps(body))
        return cls(status, str(error.get("message", "")), error.get("type"), error.get("param"), error.get("code"))


def _error_from_response(response: httpx.Response) -> APIError:
    try:
        body = response.json()
    except ValueError:
        return APIError(response.status_code, response.text or response.reason_phrase)
    if isinstance(body, dict):
        return APIError.from_body(response.status_code, body)
    return APIError(response.status_code, response.text)


def _json(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise _error_from_response(response)
    return response.json()


class SSEDecoder:
    """Server-sent events to JSON payloads: data lines are joined until a blank line ends the
    event; [DONE] ends the stream (`done` becomes true); an error payload raises APIError."""

    def __init__(self):
        self._data: list[str] = []
        self.done = False

    def feed(self, line: str) -> Iterable[dict]:
        line = line.rstrip("\r")
        if line.startswith("data:"):
            self._data.append(line[6:] if line.startswith("data: ") else line[5:])
            return ()
        if line or not self._data:  # a comment, another field, or a stray blank line
            return ()
        data, self._data = "\n".join(self._data), []
        if data == "[DONE]":
            self.done = True
            return ()
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event:
            raise APIError.from_body(None, event)
        return (event,)

    def finish(self) -> list[dict]:
        """At the end of the body: a last event not followed by a blank line; raises if the
        stream was cut before [DONE]."""
        events = list(self.feed(""))
        if not self.done:
            raise APIError(None, "the stream ended before data: [DONE]", "incomplete_stream")
        return events


class _Base:
    def __init__(self, base_url: str, api_key: str | None, headers: dict | None):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @staticmethod
    def _stream_body(body: dict) -> dict:
        return {**body, "stream": True}


class Client(_Base):
    """Blocking client; `headers` go with every request (e.g. {"X-Session-ID": ...})."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, headers: dict | None = None):
        super().__init__(base_url, api_key, headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def models(self) -> list[dict]:
        return _json(self._http.get("/v1/models"))["data"]

    def completions(self, **body) -> dict:
        return _json(self._http.post("/v1/completions", json=body))

    def chat(self, **body) -> dict:
        return _json(self._http.post("/v1/chat/completions", json=body))

    def tokenize(self, **body) -> dict:
        return _json(self._http.post("/tokenize", json=body))

    def detokenize(self, **body) -> dict:
        return _json(self._http.post("/detokenize", json=body))

    def stream_completions(self, **body) -> Iterator[dict]:
        return self._stream("/v1/completions", self._stream_body(body))

    def stream_chat(self, **body) -> Iterator[dict]:
        return self._stream("/v1/chat/completions", self._stream_body(body))

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def metrics(self) -> str:
        response = self._http.get("/metrics")
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response.text

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        # Closing the generator early closes the connection, which aborts the request.
        with self._http.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                response.read()
                raise _error_from_response(response)
            decoder = SSEDecoder()
            for line in response.iter_lines():
                yield from decoder.feed(line)
                if decoder.done:
                    return
            yield from decoder.finish()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of Client; streams are async iterators (close them with
    `contextlib.aclosing` if you leave early). `max_connections=None` lifts the pool limit."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, headers: dict | None = None,
                 max_connections: int | None = 100):
        super().__init__(base_url, api_key, headers)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       limits=limits)

    async def models(self) -> list[dict]:
        return _json(await self._http.get("/v1/models"))["data"]

    async def completions(self, **body) -> dict:
        return _json(await self._http.post("/v1/completions", json=body))

    async def chat(self, **body) -> dict:
        return _json(await self._http.post("/v1/chat/completions", json=body))

    async def tokenize(self, **body) -> dict:
        return _json(await self._http.post("/tokenize", json=body))

    async def detokenize(self, **body) -> dict:
        return _json(await self._http.post("/detokenize", json=body))

    def stream_completions(self, **body) -> AsyncIterator[dict]:
        return self._stream("/v1/completions", self._stream_body(body))

    def stream_chat(self, **body) -> AsyncIterator[dict]:
        return self._stream("/v1/chat/completions", self._stream_body(body))

    async def health(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def metrics(self) -> str:
        response = await self._http.get("/metrics")
        if response.status_code >= 400:
            raise _error_from_response(response)
        return response.text

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        async with self._http.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _error_from_response(response)
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                for event in decoder.feed(line):
                    yield event
                if decoder.done:
                    return
            for event in decoder.finish():
                yield event

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
