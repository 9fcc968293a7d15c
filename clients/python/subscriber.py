#!/usr/bin/env python3
"""Print the events of lamplight rooms as JSON lines, resuming after disconnects without loss.

    LAMPLIGHT_TOKEN=$(lamplight token --sub u1 --tid t1 --projects p1)
    python subscriber.py --room tenant:t1:project:p1

Rooms belong to a tenant: `tenant:{tid}`, `tenant:{tid}:user:{sub}`, `tenant:{tid}:project:{pid}`,
`tenant:{tid}:channel:{cid}`; `user:{sub}` is shorthand for the token's own tenant. The server answers in
the name you subscribed with, so the `since` map below is keyed by your names either way.

Only the generated stubs (`generate.sh`) and grpcio are used: this is the contract as any stack sees it.
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from lamplight.v1 import events_pb2, events_pb2_grpc  # noqa: E402

# Trailer of a stream the server ended: JSON room -> last event id delivered.
RESUME_KEY = "lamplight-resume-since"
# Stream ends worth reconnecting after: server restarting/unreachable, or this client fell behind.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def subscribe(stub, token, rooms, since=None, timeout=None):
    """Yields ("connected", Subscribed), ("event", Event), ("reset", Reset) and ("disconnected",
    RpcError) tuples, reconnecting with backoff after retryable stream ends.

    `since` (room -> last event id seen) is kept up to date, so every reconnect replays exactly what was
    missed: from each event's id, from the room's position in `Subscribed`, and from the resume trailer of
    a stream the server ended. Other errors (permission denied, an expired token: fetch a new one and call
    again with the same `since`) are raised. `timeout` bounds each stream, for tests.
    """
    since = since if since is not None else {}
    delay = 0.2
    while True:
        start = {}
        call = stub.Subscribe(
            events_pb2.SubscribeRequest(rooms=rooms, since=since),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=timeout,
        )
        try:
            for response in call:
                kind = response.WhichOneof("kind")
                if kind == "subscribed":
                    delay = 0.2
                    for position in response.subscribed.rooms:
                        start[position.room] = position.last_event_id
                        if position.room not in since and position.last_event_id:
                            since[position.room] = position.last_event_id
                    yield "connected", response.subscribed
                elif kind == "event":
                    since[response.event.room] = response.event.id
                    yield "event", response.event
                elif kind == "reset":
                    # History could not cover `since`: live events follow from where the room stood.
                    if start.get(response.reset.room):
                        since[response.reset.room] = start.pop(response.reset.room)
                    yield "reset", response.reset
            raise AssertionError("lamplight streams end with a status")
        except grpc.RpcError as err:
            resume = dict(err.trailing_metadata() or ()).get(RESUME_KEY)
            if resume:
                since.update({room: id_ for room, id_ in json.loads(resume).items() if id_})
            if err.code() not in RETRYABLE:
                raise
            yield "disconnected", err
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, 30.0)


def event_json(event):
    """The event as a JSON object: proto field names, every field of the payload, RFC 3339 time."""
    return json_format.MessageToDict(
        event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("LAMPLIGHT_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("LAMPLIGHT_TOKEN"),
                        help="default: $LAMPLIGHT_TOKEN")
    parser.add_argument("--room", action="append", required=True, help="repeat for several rooms")
    parser.add_argument("--since", action="append", default=[], metavar="ROOM=ID")
    parser.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("no token: pass --token or set LAMPLIGHT_TOKEN")
    since = dict(pair.split("=", 1) for pair in args.since)
    printed = 0
    with grpc.insecure_channel(args.addr) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        try:
            for kind, item in subscribe(stub, args.token, args.room, since):
                if kind == "connected":
                    print(f"subscriber: connected to {args.addr}", file=sys.stderr, flush=True)
                elif kind == "disconnected":
                    print(f"subscriber: {item.code().name}: {item.details()}; reconnecting",
                          file=sys.stderr, flush=True)
                elif kind == "reset":
                    print(json.dumps({"reset": {"room": item.room, "reason": item.reason}}), flush=True)
                else:
                    print(json.dumps(event_json(item)), flush=True)
                    printed += 1
                    if args.count is not None and printed >= args.count:
                        break
        except grpc.RpcError as err:
            print(f"subscriber: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            pass
    resume = " ".join(f"--since {room}={id_}" for room, id_ in sorted(since.items()))
    print(f"subscriber: to resume: {resume}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
