"""Every response store keeps the same promises (server/response_store.py): in memory, in an
SQLite file, in a real Redis server. The bounds (LRU by count and bytes, the key with the
largest share losing first, the TTL), the sessions to end, the history a continuation keeps;
and for the stores that outlive a process, that a second store on the same file or server (a
restarted server, another replica) sees the same responses."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from server.response_store import Chain, MemoryResponseStore, StoredResponse
from server.response_stores import open_response_store
from server.response_store_sqlite import SQLiteResponseStore
from tests.redis_server import REDIS_SERVER, RedisServer

BACKENDS = ["memory", "sqlite", "redis"]


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def make_store(request, tmp_path):
    """A factory of stores of the test's backend; stores made with `shared=True` see the same
    responses as the first one (the same file, the same Redis database)."""
    backend = request.param
    made = []

    def make(max_responses=100, ttl=3600.0, max_bytes=10**9, clock=None, shared=False):
        bounds = (max_responses, ttl, max_bytes, 262_144)
        if backend == "memory":
            assert not shared
            store = MemoryResponseStore(*bounds, clock=clock or Clock())
        elif backend == "sqlite":
            store = SQLiteResponseStore(str(tmp_path / "responses.sqlite3"), *bounds, clock=clock or Clock())
        else:
            server = request.getfixturevalue("redis_server")
            if not made:
                server.flush()
            from server.response_store_redis import RedisResponseStore
            store = RedisResponseStore(server.url, *bounds, clock=clock or Clock())
        made.append(store)
        return store

    make.backend = backend
    yield make
    for store in made:
        store.close()


def node(response_id: str, parent: StoredResponse | None = None, tenant: str | None = "t",
         text: str = "reply") -> StoredResponse:
    chain = parent.chain if parent is not None else Chain(f"session-{response_id}")
    return StoredResponse(response_id, tenant, chain, parent, (("msg_in", "user", "hi"),), None, text, "msg_out",
                          {"status": "completed", "metadata": {"k": "v"}})


def found(store, response_id: str, tenant: str | None = "t") -> str | None:
    got, _ = store.get(response_id, tenant)
    return got.id if got is not None else None


parametrized = pytest.mark.parametrize("make_store", BACKENDS, indirect=True)


@parametrized
def test_least_recently_used_and_idle_responses_go_and_their_sessions_end(make_store):
    clock = Clock()
    store = make_store(max_responses=3, ttl=10.0, clock=clock)
    a = node("a")
    assert store.add(a) == []
    store.add(node("b", parent=a))
    clock.now += 1
    store.add(node("c"))
    clock.now += 1
    assert found(store, "a") == "a" and found(store, "a", "other") is None  # another tenant: unknown
    clock.now += 1
    assert store.add(node("d")) == []  # b goes (a was used); chain a-b still has a
    assert found(store, "b") is None
    clock.now += 1
    assert store.add(node("e")) == ["session-c"]  # c was its chain's last response
    clock.now += 11
    got, ended = store.get("e", "t")
    assert got is None and sorted(ended) == ["session-a", "session-d", "session-e"]
    assert len(store) == 0


@parametrized
def test_one_key_flooding_the_store_forgets_its_own_responses_first(make_store):
    clock = Clock()
    store = make_store(max_responses=4, clock=clock)
    store.add(node("mine", tenant="quiet"))
    for i in range(20):
        clock.now += 1
        store.add(node(f"flood-{i}", tenant="loud"))
    assert found(store, "mine", "quiet") == "mine" and len(store) == 4
    assert [found(store, f"flood-{i}", "loud") for i in range(17, 20)] == [f"flood-{i}" for i in range(17, 20)]
    assert found(store, "flood-16", "loud") is None


@parametrized
def test_a_forgotten_responses_history_stays_for_the_responses_that_continue_it(make_store):
    clock = Clock()
    store = make_store(clock=clock)
    a = node("a", text="x" * 10_000)
    store.add(a)
    clock.now += 1
    store.add(node("b", parent=a))
    assert store.delete("a", "t") == (True, [])  # not the head, and b still needs its history
    assert found(store, "a") is None and store.delete("a", "t") == (False, [])
    b, _ = store.get("b", "t")
    assert b.conversation() == [("user", "hi"), ("assistant", "x" * 10_000), ("user", "hi"), ("assistant", "reply")]
    assert b.chain.session_id == "session-a" and b.fields["metadata"] == {"k": "v"}
    assert store.delete("b", "t") == (True, ["session-a"])
    # A parent forgotten while its continuation ran comes back with it.
    c = node("c")
    store.add(c)
    store.delete("c", "t")
    store.add(node("d", parent=c))
    d, _ = store.get("d", "t")
    assert d.conversation()[:2] == [("user", "hi"), ("assistant", "reply")] and found(store, "c") is None


@parametrized
def test_the_memory_bound_evicts_but_never_the_response_just_added(make_store):
    size = node("p", text="x" * 10_000).size
    store = make_store(max_bytes=size + 1)
    store.add(node("p", text="x" * 10_000))
    store.add(node("q", text="x" * 10_000))
    assert found(store, "p") is None and found(store, "q") == "q"


@pytest.mark.parametrize("make_store", ["sqlite", "redis"], indirect=True)
def test_a_restarted_server_or_another_replica_sees_the_same_responses(make_store):
    clock = Clock()
    first = make_store(clock=clock)
    a = node("a")
    first.add(a)
    first.add(node("b", parent=a))
    second = make_store(clock=clock, shared=True)
    b, _ = second.get("b", "t")
    assert b.conversation() == [("user", "hi"), ("assistant", "reply")] * 2
    second.add(node("c", parent=b))  # the other replica continues the chain
    c, _ = first.get("c", "t")
    assert [turn for turn in c.conversation()] == [("user", "hi"), ("assistant", "reply")] * 3
    assert second.delete("b", "t") == (True, []) and found(first, "b") is None
    # Many writers at once keep one consistent store.
    errors = []

    def write(store, prefix):
        try:
            for i in range(30):
                store.add(node(f"{prefix}-{i}", tenant=prefix))
        except Exception as exc:  # noqa: BLE001 (the test reports it)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(store, name)) for store, name in ((first, "x"), (second, "y"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(first) == len(second) == 2 + 60


@pytest.mark.parametrize("make_store", ["sqlite", "redis"], indirect=True)
def test_a_method_that_fails_halfway_leaves_nothing_stranded(make_store, monkeypatch):
    """A connection lost between two writes of a method (here: the row's deletion fails once):
    the next calls collect what it left, and the store's bytes come back to its kept rows'."""
    store = make_store()
    a = node("a")
    store.add(a)
    store.add(node("b"))
    original = type(store)._delete
    calls = []

    def fail_once(self, row):
        calls.append(row.id)
        if len(calls) == 1:
            raise ConnectionError("lost")
        return original(self, row)

    monkeypatch.setattr(type(store), "_delete", fail_once)
    with pytest.raises(ConnectionError):
        store.delete("a", "t")
    monkeypatch.setattr(type(store), "_delete", original)
    assert found(store, "a") is None or make_store.backend == "sqlite"  # SQLite rolled the whole call back
    store.delete("a", "t")
    store.expire()
    with store._transaction():
        assert store._num_kept() == 1 and store._num_bytes() == node("b").size
        assert store._stranded(10) == []


def test_open_response_store_picks_the_backend_by_its_name(tmp_path):
    assert isinstance(open_response_store("memory"), MemoryResponseStore)
    path = tmp_path / "dir" / "store.sqlite3"
    store = open_response_store(str(path))
    assert isinstance(store, SQLiteResponseStore) and path.is_file() and str(path) in store.description
    store.add(node("a"))
    # Every key's prompts and replies: readable by the server's user alone.
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for file in (path, path.with_name(path.name + "-wal")):
        assert file.stat().st_mode & 0o777 == 0o600, file
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(ValueError, match="cannot reach Redis"):
        open_response_store("redis://127.0.0.1:1/0")


def test_replicas_on_several_hosts_share_chains_through_redis(redis_server):
    """Two servers on one Redis (as replicas on two hosts would be): every turn of a chain runs
    on the other replica than the last, each finds the turn before, and a restarted replica
    continues the chain."""
    import httpx

    from tests.server_process import ServerProcess

    redis_server.flush()
    args = ("--response-store", redis_server.url)
    replicas = [ServerProcess(*args), ServerProcess(*args)]
    try:
        previous = None
        for turn in range(10):
            body = {"input": f"Turn {turn}.", "max_output_tokens": 3, "temperature": 0, "attention_window": 252}
            if previous is not None:
                body["previous_response_id"] = previous
            response = httpx.post(f"{replicas[turn % 2].url}/v1/responses", json=body, timeout=60)
            assert response.status_code == 200, (turn, response.text)
            assert response.json()["usage"]["input_tokens"] > 10 * turn  # the whole history, from either replica
            previous = response.json()["id"]
        replicas[0].stop()
        replicas[0] = ServerProcess(*args, port=replicas[0].port)
        found = httpx.get(f"{replicas[0].url}/v1/responses/{previous}", timeout=60)
        assert found.status_code == 200 and found.json()["id"] == previous
        items = httpx.get(f"{replicas[0].url}/v1/responses/{previous}/input_items", timeout=60).json()
        assert items["data"][0]["content"][0]["text"] == "Turn 9."
        assert httpx.delete(f"{replicas[1].url}/v1/responses/{previous}", timeout=60).status_code == 200
        assert httpx.get(f"{replicas[0].url}/v1/responses/{previous}", timeout=60).status_code == 404
    finally:
        for replica in replicas:
            replica.stop()


def test_a_store_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    from tests.server_process import REPO_ROOT

    blocker = tmp_path / "file"
    blocker.write_text("")
    run = subprocess.run([sys.executable, "-m", "server", "--response-store", str(blocker / "responses.sqlite3")],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sinkserve: error: --response-store {blocker / 'responses.sqlite3'}: ")
    assert line.endswith("(name another file, a redis:// URL, or memory)")


def test_a_store_that_goes_away_is_a_503_never_a_500_or_a_pretended_store(redis_server):
    """Redis stops while the server runs: storing, continuing, retrieving and deleting are 503s
    that say so (streamed: an error event and response.failed); store: false still works."""
    import httpx

    from tests.redis_server import RedisServer
    from tests.server_process import ServerProcess

    own = RedisServer()  # this test stops it
    try:
        with ServerProcess("--response-store", own.url) as server:
            first = httpx.post(f"{server.url}/v1/responses", json={"input": "Hi", "max_output_tokens": 2}, timeout=60)
            assert first.status_code == 200
            own.stop()
            body = {"input": "Hi", "max_output_tokens": 2}
            for response in (httpx.post(f"{server.url}/v1/responses", json=body, timeout=60),
                             httpx.post(f"{server.url}/v1/responses", timeout=60,
                                        json={**body, "previous_response_id": first.json()["id"]}),
                             httpx.get(f"{server.url}/v1/responses/{first.json()['id']}", timeout=60),
                             httpx.delete(f"{server.url}/v1/responses/{first.json()['id']}", timeout=60)):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "response_store_unavailable"
            with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True},
                              timeout=60) as stream:
                kinds = [line[len("event: "):] for line in stream.iter_lines() if line.startswith("event: ")]
            assert kinds[-2:] == ["error", "response.failed"], kinds
            unstored = httpx.post(f"{server.url}/v1/responses", json={**body, "store": False}, timeout=60)
            assert unstored.status_code == 200
            assert "Traceback" in server.log()  # the cause is logged for the operator
    finally:
        if own.process.poll() is None:
            own.stop()
