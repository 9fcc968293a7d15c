"""The Python example against the real server (target/debug/lamplight): another stack, generated from
proto/ alone, must work with the contract as written.

Run with run-test.sh (it builds the server, makes the venv and generates the stubs).
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gen"))
sys.path.insert(0, HERE)

import grpc  # noqa: E402
from lamplight.v1 import events_pb2, events_pb2_grpc  # noqa: E402

import publisher  # noqa: E402
import subscriber  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BINARY = os.path.join(ROOT, "target", "debug", "lamplight")
SECRET = "python-example-secret"
ROOM = "tenant:t1:project:p1"
WAIT = 20  # seconds: the limit for anything a test waits for


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LAMPLIGHT_") and k not in ("REDIS_URL", "RUST_LOG")}
    env["RUST_LOG"] = "info"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """Reads a pipe line by line in a thread, so waiting for a line can time out."""

    def __init__(self, pipe):
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe):
        for line in pipe:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, needle, timeout=WAIT):
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line containing {needle!r} within {timeout}s: {seen}")
            if line is None:
                raise AssertionError(f"output ended before {needle!r}: {seen}")
            seen.append(line)
            if needle in line:
                return line


class Server:
    def __init__(self):
        if not os.access(BINARY, os.X_OK):
            raise AssertionError(f"{BINARY} is missing: run `cargo build` (run-test.sh does)")
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", self.addr, "--jwt-secret", SECRET,
             "--jwt-leeway-secs", "0", "--heartbeat-secs", "1", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
        Lines(self.proc.stdout).wait_for("listening")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


def token(*claims):
    """A token minted by `lamplight token` with the server's secret."""
    out = subprocess.run([BINARY, "token", "--jwt-secret", SECRET, *claims], check=True,
                         capture_output=True, text=True, timeout=WAIT, env=clean_env())
    return out.stdout.strip()


def publisher_token():
    return token("--sub", "billing", "--roles", "publisher")


def user_token():
    return token("--sub", "u1", "--tid", "t1", "--projects", "p1")


def example(script, *args, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], text=True,
                            env=clean_env(), **kwargs)


def task_event(task_id, title=""):
    return events_pb2.Event(room=ROOM, type="task.created",
                            task=events_pb2.Task(id=task_id, title=title))


def test_the_published_event_reaches_the_subscriber_with_every_field(server):
    sub = example("subscriber.py", "--addr", server.addr, "--token", user_token(),
                  "--room", ROOM, "--count", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        errors = Lines(sub.stderr)
        errors.wait_for("connected")
        pub = example("publisher.py", "--addr", server.addr, "--token", publisher_token(),
                      "--room", ROOM, "--type", "task.created",
                      "--task-json", '{"id": "42", "title": "Ship it", "priority": "high"}',
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = pub.communicate(timeout=WAIT)
        assert pub.returncode == 0, err
        event_id = out.strip()
        assert event_id

        line, _ = sub.communicate(timeout=WAIT)
        assert sub.returncode == 0
        event = json.loads(line)
        assert event.pop("time").endswith("Z")
        assert event == {
            "id": event_id,
            "room": ROOM,
            "type": "task.created",
            "publisher_id": "billing",
            "task": {"id": "42", "project_id": "", "tenant_id": "", "title": "Ship it",
                     "status": "", "priority": "high", "created_by_id": ""},
        }
    finally:
        sub.kill()
        sub.wait(timeout=WAIT)


def test_retries_reuse_the_idempotency_key_and_resume_replays_what_was_missed(server):
    with grpc.insecure_channel(server.addr) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        svc = publisher_token()
        first = publisher.publish(stub, svc, task_event("a"), idempotency_key="k-1")
        again = publisher.publish(stub, svc, task_event("a"), idempotency_key="k-1")
        assert again == first, "the same key returns the first id"
        second = publisher.publish(stub, svc, task_event("b"))

        # Resume after `first`: exactly `second` is replayed (the repeated publish was not delivered).
        since = {ROOM: first}
        stream = subscriber.subscribe(stub, user_token(), [ROOM], since, timeout=WAIT)
        kind, subscribed = next(stream)
        assert kind == "connected"
        assert subscribed.rooms[0].recovered
        kind, event = next(stream)
        assert (kind, event.id, event.task.id) == ("event", second, "b")
        assert since == {ROOM: second}
        stream.close()


def test_a_stream_the_server_ends_names_the_resume_position(server):
    with grpc.insecure_channel(server.addr) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        event_id = publisher.publish(stub, publisher_token(), task_event("a"))
        # A raw stream, to read the status and trailer the way any client sees them.
        call = stub.Subscribe(events_pb2.SubscribeRequest(rooms=[ROOM], since={ROOM: event_id}),
                              metadata=[("authorization", f"Bearer {user_token()}")], timeout=WAIT)
        first = next(call)
        assert first.WhichOneof("kind") == "subscribed"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            for response in call:
                assert response.WhichOneof("kind") == "heartbeat", response
        err = ended.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "shutting down" in err.details()
        trailer = dict(err.trailing_metadata())[subscriber.RESUME_KEY]
        assert json.loads(trailer) == {ROOM: event_id}
        assert server.proc.wait(timeout=WAIT) == 0


def test_errors_come_back_as_grpc_status_codes(server):
    pub = example("publisher.py", "--addr", server.addr, "--token", user_token(),
                  "--room", ROOM, "--type", "task.created", "--task-json", "{}",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = pub.communicate(timeout=WAIT)
    assert pub.returncode == 1
    assert out == ""
    assert err.startswith("publisher: PERMISSION_DENIED: "), err

    with grpc.insecure_channel(server.addr) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        stream = subscriber.subscribe(stub, user_token(), ["tenant:t2:project:p1"], timeout=WAIT)
        with pytest.raises(grpc.RpcError) as denied:
            next(stream)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tenant:t2:project:p1" in denied.value.details()
