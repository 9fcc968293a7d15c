#!/usr/bin/env python3
"""Publish one task event to lamplight and print the id the server assigned.

    LAMPLIGHT_TOKEN=$(lamplight token --sub billing --roles publisher)
    python publisher.py --room tenant:t1:project:p1 --type task.created \
        --task-json '{"id": "42", "title": "Ship it"}'

Only the generated stubs (`generate.sh`) and grpcio are used: this is the contract as any stack sees it.
"""

import argparse
import json
import os
import random
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from lamplight.v1 import events_pb2, events_pb2_grpc  # noqa: E402

# Worth retrying: the server is restarting or unreachable, or the answer did not come in time.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def publish(stub, token, event, idempotency_key=None, attempts=5, timeout=5.0):
    """Publishes `event` and returns its id.

    The idempotency key is chosen once and sent with every retry: if an attempt reached the server but its
    answer was lost, the retry gets the first id back and the event is delivered once (the server keeps
    keys per publisher for 10 minutes). Other errors are raised as `grpc.RpcError`.
    """
    request = events_pb2.PublishRequest(
        event=event, idempotency_key=idempotency_key or uuid.uuid4().hex
    )
    metadata = [("authorization", f"Bearer {token}")]
    delay = 0.2
    for attempt in range(attempts):
        try:
            return stub.Publish(request, metadata=metadata, timeout=timeout).id
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("LAMPLIGHT_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("LAMPLIGHT_TOKEN"),
                        help="a token with role publisher (default: $LAMPLIGHT_TOKEN)")
    parser.add_argument("--room", required=True)
    parser.add_argument("--type", required=True, help="e.g. task.created")
    parser.add_argument("--task-json", required=True, help="the Task's fields as a JSON object")
    parser.add_argument("--idempotency-key")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("no token: pass --token or set LAMPLIGHT_TOKEN")
    task = json_format.ParseDict(json.loads(args.task_json), events_pb2.Task())
    event = events_pb2.Event(room=args.room, type=args.type, task=task)
    with grpc.insecure_channel(args.addr) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            print(publish(stub, args.token, event, args.idempotency_key))
        except grpc.RpcError as err:
            print(f"publisher: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
