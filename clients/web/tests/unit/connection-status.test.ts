import { createElement } from "react";
import { renderToStaticMarkup } from "react-dom/server";
import { afterEach, describe, expect, it } from "vitest";

import { createLamplight, type ConnectionState, type Lamplight, type LamplightOptions } from "../../src/index.js";
import { ConnectionStatus, LamplightProvider } from "../../src/react/index.js";

// No server: these clients never get as far as the network (their token never comes, or fails).
const clients: Lamplight[] = [];
function client(options: Partial<LamplightOptions>): Lamplight {
  const c = createLamplight({
    baseUrl: "http://127.0.0.1:9",
    autoJoinUserRooms: false,
    rooms: ["tenant:t1:project:p1"],
    backoff: { initialMs: 60_000, maxMs: 60_000 },
    getToken: () => new Promise<string>(() => undefined),
    ...options,
  });
  clients.push(c);
  return c;
}

function settled(c: Lamplight, state: ConnectionState): Promise<void> {
  return new Promise((resolve) => {
    if (c.state === state) return resolve();
    const off = c.on("state", (s) => {
      if (s.state !== state) return;
      off();
      resolve();
    });
  });
}

const render = (c: Lamplight) => renderToStaticMarkup(createElement(LamplightProvider, { client: c }, createElement(ConnectionStatus)));

afterEach(() => {
  while (clients.length) clients.pop()!.close();
});

describe("<ConnectionStatus/>", () => {
  it("offers Retry in every state but connected", async () => {
    const connecting = client({});
    await settled(connecting, "connecting");
    const reconnecting = client({ getToken: () => Promise.reject(new TypeError("Failed to fetch")) });
    await settled(reconnecting, "reconnecting");
    const failed = client({ maxAttempts: 0, getToken: () => Promise.reject(new TypeError("Failed to fetch")) });
    await settled(failed, "error");
    const disconnected = client({ autoConnect: false });

    for (const [c, state] of [
      [connecting, "connecting"],
      [reconnecting, "reconnecting"],
      [failed, "error"],
      [disconnected, "disconnected"],
    ] as const) {
      expect(c.state).toBe(state);
      const html = render(c);
      expect(html, state).toContain(`data-lamplight-state="${state}"`);
      expect(html, state).toMatch(/<button[^>]*>Retry<\/button>/);
    }
  });
});
