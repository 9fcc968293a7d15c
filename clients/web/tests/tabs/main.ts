/**
 * One browser tab of an app using lamplight, for the e2e tests that open many of them: the test starts a
 * client (`window.tab.start(...)`), which joins its rooms through the browser client, and reads back what
 * the tab received.
 */

import { createLamplight, type Lamplight } from "../../src/index.js";

export interface TabStart {
  /** lamplight's grpc-web address, e.g. https://127.0.0.1:PORT. */
  baseUrl: string;
  token: string;
  rooms: string[];
}

export interface TabView {
  state: string;
  rooms: string[];
  /** Events received, in order. */
  events: { room: string; id: string }[];
}

export interface Tab {
  /** Creates the client and resolves once every room is joined (rejects with the join's error). */
  start(options: TabStart): Promise<void>;
  view(): TabView;
  /** Users present in a room (a unary grpc-web call). */
  presence(room: string): Promise<string[]>;
  close(): void;
}

let client: Lamplight | undefined;
const events: { room: string; id: string }[] = [];

const tab: Tab = {
  async start({ baseUrl, token, rooms }) {
    if (client) throw new Error("this tab already started a client");
    const c = createLamplight({
      baseUrl,
      getToken: () => token,
      autoJoinUserRooms: false,
      heartbeatIntervalMs: 1000,
      backoff: { initialMs: 100, maxMs: 1000 },
    });
    client = c;
    c.on("event", (e) => events.push({ room: e.room, id: e.id }));
    for (const room of rooms) await c.join(room);
  },
  view: () => ({ state: client?.state ?? "none", rooms: client?.rooms() ?? [], events: [...events] }),
  async presence(room) {
    if (!client) throw new Error("start() first");
    return (await client.getPresence(room)).userIds;
  },
  close: () => client?.close(),
};

(globalThis as unknown as { tab: Tab }).tab = tab;
document.body.dataset.ready = "1";
