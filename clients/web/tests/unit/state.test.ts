import { describe, expect, it } from "vitest";

import { CONNECTION_STATES, nextState, type ConnectionInput, type ConnectionState } from "../../src/state.js";

const run = (start: ConnectionState, inputs: ConnectionInput[]) => {
  const seen: ConnectionState[] = [];
  let s = start;
  for (const i of inputs) {
    s = nextState(s, i);
    seen.push(s);
  }
  return seen;
};

describe("connection state machine", () => {
  it("first connection: disconnected -> connecting -> connected", () => {
    expect(run("disconnected", ["open", "subscribed"])).toEqual(["connecting", "connected"]);
  });

  it("a join re-opens the stream without leaving connected", () => {
    expect(run("connected", ["open", "subscribed"])).toEqual(["connected", "connected"]);
  });

  it("a failure goes to reconnecting, retries stay there until subscribed", () => {
    expect(run("connected", ["failed", "open", "failed", "open", "subscribed"])).toEqual([
      "reconnecting",
      "reconnecting",
      "reconnecting",
      "reconnecting",
      "connected",
    ]);
  });

  it("a failed first attempt is reconnecting too", () => {
    expect(run("disconnected", ["open", "failed", "open"])).toEqual(["connecting", "reconnecting", "reconnecting"]);
  });

  it("giving up is error; connecting again starts over", () => {
    expect(run("reconnecting", ["fatal", "open", "subscribed"])).toEqual(["error", "connecting", "connected"]);
  });

  it("closing or leaving every room is disconnected, and a late failure does not revive it", () => {
    for (const s of CONNECTION_STATES) expect(nextState(s, "idle")).toBe("disconnected");
    expect(nextState("disconnected", "failed")).toBe("disconnected");
  });

  it("every state handles every input", () => {
    const inputs: ConnectionInput[] = ["open", "subscribed", "failed", "idle", "fatal"];
    for (const s of CONNECTION_STATES) for (const i of inputs) expect(CONNECTION_STATES).toContain(nextState(s, i));
  });
});
