import { Code, ConnectError } from "@connectrpc/connect";
import { createElement } from "react";
import { renderToStaticMarkup } from "react-dom/server";
import { describe, expect, it } from "vitest";

import {
  ADMIN_DISCONNECT_TEXT,
  DisconnectedError,
  JoinError,
  RoomRemovedError,
  disconnectReason,
  isAdminDisconnect,
  type Lamplight,
} from "../../src/index.js";
import { ConnectionStatus, LamplightProvider } from "../../src/react/index.js";

// The status lamplight ends a stream with on AdminService.Disconnect.
const disconnect = (reason: string) =>
  new ConnectError(`disconnected by an administrator (${reason}): do not reconnect`, Code.PermissionDenied);

describe("administrator's disconnect", () => {
  it("is a PERMISSION_DENIED on a confirmed stream, or one that says so", () => {
    const refusal = new ConnectError("not allowed in room tenant:t1:project:p9: not a member", Code.PermissionDenied);
    expect(isAdminDisconnect(refusal, false)).toBe(false);
    // Rooms are refused when a stream opens: on a confirmed stream it can only be a disconnect.
    expect(isAdminDisconnect(refusal, true)).toBe(true);
    expect(isAdminDisconnect(disconnect("left the team"), false)).toBe(true);
    expect(isAdminDisconnect(new ConnectError(ADMIN_DISCONNECT_TEXT, Code.Unauthenticated), true)).toBe(false);
    expect(isAdminDisconnect(new ConnectError("server shutting down", Code.Unavailable), true)).toBe(false);
  });

  it("carries the administrator's reason", () => {
    expect(disconnectReason("disconnected by an administrator (left the team (again)): do not reconnect")).toBe(
      "left the team (again)",
    );
    expect(disconnectReason("something else")).toBe("something else");
    const err = new DisconnectedError(disconnect("account closed"));
    expect(err.reason).toBe("account closed");
    expect(err.message).toBe("disconnected by an administrator: account closed");
    expect(err.status.code).toBe(Code.PermissionDenied);
    expect(err).toBeInstanceOf(Error);
  });
});

describe("RoomRemovedError", () => {
  it("is a JoinError (PERMISSION_DENIED) naming the room and the reason", () => {
    const err = new RoomRemovedError("tenant:t1:project:p1", "moved to another team");
    expect(err).toBeInstanceOf(JoinError);
    expect(err.name).toBe("RoomRemovedError");
    expect(err.room).toBe("tenant:t1:project:p1");
    expect(err.reason).toBe("moved to another team");
    expect(err.code).toBe(Code.PermissionDenied);
    expect(err.message).toBe("tenant:t1:project:p1 was removed by an administrator: moved to another team");
    expect(new RoomRemovedError("tenant:t1", "").message).toBe("tenant:t1 was removed by an administrator");
  });
});

// A client frozen in one state: only what <ConnectionStatus/> reads. Not a transport: nothing is sent.
function stuckClient(state: Lamplight["state"], error: Error | undefined): Lamplight {
  const frozen: Partial<Lamplight> = {
    state,
    error,
    identity: undefined,
    nextRetryAt: undefined,
    on: () => () => undefined,
    reconnect: () => undefined,
  };
  return frozen as Lamplight;
}

const render = (c: Lamplight, props: Record<string, unknown> = {}) =>
  renderToStaticMarkup(createElement(LamplightProvider, { client: c }, createElement(ConnectionStatus, props)));

describe("<ConnectionStatus/> after an administrator's disconnect", () => {
  it("shows the reason and offers no Retry", () => {
    const html = render(stuckClient("error", new DisconnectedError(disconnect("account closed"))));
    expect(html).toContain('data-lamplight-state="error"');
    expect(html).toContain("Disconnected by an administrator");
    expect(html).toContain("(account closed)");
    expect(html).not.toContain("Retry");
    expect(render(stuckClient("error", new DisconnectedError(disconnect("x"))), { disconnectedLabel: "Signed out" })).toContain(
      "Signed out",
    );
  });

  it("still offers Retry for other errors", () => {
    const html = render(stuckClient("error", new ConnectError("no such method", Code.Unimplemented)));
    expect(html).toContain("Connection error");
    expect(html).toMatch(/<button[^>]*>Retry<\/button>/);
  });
});
