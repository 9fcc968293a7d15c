/**
 * The browser client over HTTPS in Debian's Chromium: an HTTPS page (tests/tabs) talks grpc-web to a
 * lamplight serving TLS on its one port (`--tls-cert-file`, `--tls-key-file`), with certificates made at
 * run time by a throwaway CA that only this browser trusts. Browsers speak HTTP/2 only over TLS: there,
 * every tab's Subscribe stream is one HTTP/2 stream and the tabs share a connection, so more tabs than
 * HTTP/1.1's six connections per host stay live at once. Over plain HTTP the same page uses HTTP/1.1.
 */

import type { BrowserContext, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

import type { Tab, TabView } from "../tabs/main.js";
import { launchChromium, servePage, type DemoServer, type TestBrowser } from "../support/browser.js";
import { makeCertificates, type TestCertificates } from "../support/certs.js";
import { TABS_DIR } from "../support/env.js";
import { freePort, Publisher, startLamplight, userToken, type LamplightServer } from "../support/lamplight.js";

const P1 = "tenant:t1:project:p1";
const P2 = "tenant:t1:project:p2";
const C1 = "tenant:t1:channel:c1";
const ROOMS = [P1, P2, C1];
/** More than the 6 connections per host Chromium allows on HTTP/1.1: each tab holds a stream open. */
const TABS = 8;
const WAIT = 15_000;

type TabWindow = { tab: Tab };

/** A grpc-web response as Chromium's network stack reports it (DevTools' Protocol and Connection ID). */
interface Carried {
  tab: number;
  path: string;
  /** e.g. "h2", "http/1.1". */
  protocol: string | undefined;
  /** The socket it came over. */
  connectionId: number;
}

/**
 * A browser context (one person: one connection pool) with tabs on the page, and a record of how every
 * grpc-web response reached them, from the DevTools protocol (it sees open streams too, and the socket each
 * used). The page's own view is checked as well: lamplight sends `Timing-Allow-Origin` for its CORS
 * origins, so Resource Timing's `nextHopProtocol` of a finished call is readable (see `pageProtocols`).
 */
async function openTabs(chromium: TestBrowser, pageUrl: string, n: number, errors: string[]) {
  const context = await chromium.browser.newContext();
  const pages: Page[] = [];
  const carried: Carried[] = [];
  for (let i = 0; i < n; i++) {
    const page = await context.newPage();
    page.on("pageerror", (err) => errors.push(`tab ${i}: ${err.message}`));
    page.on("console", (msg) => {
      if (msg.type() === "error") errors.push(`tab ${i} console: ${msg.text()}`);
    });
    const cdp = await context.newCDPSession(page);
    cdp.on("Network.responseReceived", ({ type, response }) => {
      const path = new URL(response.url).pathname;
      if (type === "Preflight" || !path.startsWith("/lamplight.v1.")) return;
      carried.push({ tab: i, path, protocol: response.protocol, connectionId: response.connectionId });
    });
    await cdp.send("Network.enable");
    await page.goto(pageUrl);
    await page.locator("body[data-ready]").waitFor({ state: "attached", timeout: WAIT });
    pages.push(page);
  }
  return { context, pages, carried };
}

/** `nextHopProtocol` of the page's finished calls to `path` (Resource Timing: what the app itself sees). */
async function pageProtocols(page: Page, path: string): Promise<string[]> {
  return page.evaluate(
    (p) =>
      (performance.getEntriesByType("resource") as PerformanceResourceTiming[])
        .filter((e) => new URL(e.name).pathname === p)
        .map((e) => e.nextHopProtocol),
    path,
  );
}

/** Starts the tab's client as `user` and waits until it has joined every room (or says why not). */
async function start(page: Page, baseUrl: string, user: string): Promise<void> {
  const joined = page.evaluate(
    (o) => (window as unknown as TabWindow).tab.start(o),
    { baseUrl, token: userToken({ sub: user, projects: ["p1", "p2"], channels: ["c1"] }), rooms: ROOMS },
  );
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(async () => {
      const v = await view(page).catch(() => undefined);
      reject(new Error(`${user} has not joined ${ROOMS.join(", ")} after ${WAIT} ms (state ${v?.state}, rooms ${v?.rooms})`));
    }, WAIT);
  });
  try {
    await Promise.race([joined, late]);
  } finally {
    clearTimeout(timer);
  }
}
const view = (page: Page): Promise<TabView> => page.evaluate(() => (window as unknown as TabWindow).tab.view());
const presence = (page: Page, room: string): Promise<string[]> =>
  page.evaluate((r) => (window as unknown as TabWindow).tab.presence(r), room);

/** Waits until the tab has received every id in `ids` (in any room). */
const receives = (page: Page, ids: string[]) =>
  page.waitForFunction(
    (want) => {
      const got = new Set((window as unknown as TabWindow).tab.view().events.map((e) => e.id));
      return want.every((id) => got.has(id));
    },
    ids,
    { timeout: WAIT },
  );

/** One value of a Prometheus gauge without labels, scraped from `--metrics-listen`. */
async function gauge(metricsUrl: string, name: string): Promise<number> {
  const text = await (await fetch(metricsUrl)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`no ${name} in the metrics:\n${text}`);
  return Number(line.slice(name.length + 1));
}

describe("over HTTPS", () => {
  let certs: TestCertificates;
  let page: DemoServer;
  let server: LamplightServer;
  let chromium: TestBrowser;
  let pub: Publisher;
  let metricsUrl: string;
  let context: BrowserContext | undefined;
  const errors: string[] = [];

  beforeAll(async () => {
    certs = makeCertificates();
    page = await servePage(TABS_DIR, { cert: certs.certPem, key: certs.keyPem });
    const metricsPort = await freePort();
    metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
    server = await startLamplight({
      heartbeatSecs: 1,
      corsOrigins: [page.url],
      tls: { certFile: certs.certFile, keyFile: certs.keyFile },
      extraArgs: ["--metrics-listen", `127.0.0.1:${metricsPort}`],
    });
    chromium = await launchChromium({ trustSpki: [certs.caSpkiSha256] });
    pub = new Publisher(server.url, certs.caPem);
  });
  afterAll(async () => {
    await context?.close().catch(() => undefined);
    await chromium?.close();
    await server?.stop();
    await page?.close();
    certs?.remove();
  });

  it(`carries ${TABS} tabs' streams of ${ROOMS.length} rooms each on HTTP/2 ("h2"), sharing connections`, async () => {
    expect(server.url).toMatch(/^https:/);
    const opened = await openTabs(chromium, page.url, TABS, errors);
    context = opened.context;
    const tabs = opened.pages;
    const users = tabs.map((_, i) => `tab${i}`);
    // One after the other: over HTTP/1.1 a sixth or seventh tab's stream waits for a free connection (a
    // re-open for a join needs one more while the old stream is up) and its joins never resolve; over
    // HTTP/2 every tab's stream is live at the same time.
    for (const [i, tab] of tabs.entries()) await start(tab, server.url, users[i]!);
    for (const tab of tabs) {
      const v = await view(tab);
      expect(v.state).toBe("connected");
      expect(v.rooms.sort()).toEqual([...ROOMS].sort());
    }

    // Every tab is in every room at once, as the server sees it (a unary grpc-web call from one tab).
    for (const room of ROOMS) expect((await presence(tabs[0]!, room)).sort()).toEqual([...users].sort());

    // Events to each room reach every tab, in publish order per room.
    const published: { room: string; id: string }[] = [];
    for (let n = 0; n < 3; n++) {
      for (const room of ROOMS) published.push({ room, id: await pub.task(room, "task.created", { id: `${room}-${n}`, title: `task ${n}` }) });
    }
    for (const tab of tabs) await receives(tab, published.map((p) => p.id));
    for (const tab of tabs) {
      const got = (await view(tab)).events;
      for (const room of ROOMS) {
        expect(got.filter((e) => e.room === room).map((e) => e.id)).toEqual(published.filter((p) => p.room === room).map((p) => p.id));
      }
    }

    // All those streams are open on the server on fewer connections than there are tabs: the browser
    // multiplexes them (the publisher's gRPC client holds one connection of its own).
    const streams = await gauge(metricsUrl, "lamplight_streams_open");
    const connections = await gauge(metricsUrl, "lamplight_connections_open");
    expect(streams).toBeGreaterThanOrEqual(TABS);
    expect(connections).toBeLessThan(TABS);
    expect(connections).toBeLessThanOrEqual(3);

    // How the browser carried them: every grpc-web response of every tab (streams and unary calls) came
    // over HTTP/2, and the tabs' streams share connections.
    for (const tab of tabs) await presence(tab, P1);
    const subscribes = opened.carried.filter((c) => c.path === "/lamplight.v1.EventService/Subscribe");
    expect(new Set(subscribes.map((c) => c.tab)).size).toBe(TABS);
    expect(opened.carried.filter((c) => c.protocol !== "h2")).toEqual([]);
    // One HTTP/2 connection per origin is what Chromium keeps (two, if a race opened a second one).
    expect(new Set(subscribes.map((c) => c.connectionId)).size).toBeLessThanOrEqual(2);
    expect(new Set(opened.carried.filter((c) => c.path.endsWith("/GetPresence")).map((c) => c.tab)).size).toBe(TABS);
    // The page sees it too: its GetPresence calls report nextHopProtocol "h2".
    for (const tab of tabs) {
      const seen = await pageProtocols(tab, "/lamplight.v1.EventService/GetPresence");
      expect(seen.length).toBeGreaterThan(0);
      expect(new Set(seen)).toEqual(new Set(["h2"]));
    }
    expect(errors).toEqual([]);
  });
});

describe("over plain HTTP (the contrast)", () => {
  it("the same page's grpc-web calls go over HTTP/1.1, a connection per stream", async () => {
    const page = await servePage(TABS_DIR);
    const server = await startLamplight({ heartbeatSecs: 1, corsOrigins: [page.url] });
    const chromium = await launchChromium();
    const errors: string[] = [];
    try {
      const { pages, carried } = await openTabs(chromium, page.url, 2, errors);
      for (const [i, tab] of pages.entries()) await start(tab, server.url, `plain${i}`);
      for (const tab of pages) await presence(tab, P1);
      expect(carried.map((c) => c.path)).toContain("/lamplight.v1.EventService/GetPresence");
      expect(new Set(carried.map((c) => c.protocol))).toEqual(new Set(["http/1.1"]));
      for (const tab of pages) {
        expect(new Set(await pageProtocols(tab, "/lamplight.v1.EventService/GetPresence"))).toEqual(new Set(["http/1.1"]));
      }
      // Each open stream holds a connection of its own.
      const live = carried.filter((c) => c.path === "/lamplight.v1.EventService/Subscribe");
      expect(new Set(live.map((c) => c.connectionId)).size).toBeGreaterThanOrEqual(pages.length);
      expect(errors).toEqual([]);
    } finally {
      await chromium.close();
      await server.stop();
      await page.close();
    }
  });
});
