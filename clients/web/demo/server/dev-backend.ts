/**
 * DEVELOPMENT ONLY: a tiny stand-in for the app's backend, as a Vite plugin (dev and preview servers).
 *
 * - `GET /dev-token?sub=ada&tid=t1&projects=p1&channels=general,random&ttl=3600` mints a user token with
 *   the development secret (see ./token.ts). Never ship this: anyone who can reach it gets a token.
 * - `GET/POST /dev-api/tasks`, `GET/POST /dev-api/messages`, `POST /dev-api/simulate`: what the app's
 *   backend would do after writing to its database: keep the record and `Publish` an event to lamplight
 *   over gRPC (HTTP/2, `@connectrpc/connect-node`) with a `publisher` token.
 *
 * Requests are served to loopback clients only.
 */

import type { IncomingMessage, ServerResponse } from "node:http";
import { randomUUID } from "node:crypto";

import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Plugin } from "vite";

import { EventService } from "../../src/gen/lamplight/v1/events_pb.js";
import { mintDevToken } from "./token.js";

/** Options of {@link lamplightDevBackend}. */
export interface DevBackendOptions {
  /** lamplight's gRPC URL (default: LAMPLIGHT_URL, else http://127.0.0.1:50051). */
  lamplightUrl?: string;
}

interface TaskRecord {
  id: string;
  projectId: string;
  tenantId: string;
  title: string;
  status: string;
  priority: string;
  createdById: string;
}

interface MessageRecord {
  id: string;
  channelId: string;
  tenantId: string;
  authorId: string;
  body: string;
  at: number;
}

type Payload =
  | { case: "task"; value: Omit<TaskRecord, never> }
  | { case: "message"; value: Omit<MessageRecord, "at"> };

const STATUSES = ["todo", "in_progress", "done"];
const TITLES = [
  "Sketch the onboarding flow",
  "Fix flaky login test",
  "Write release notes",
  "Review pricing page copy",
  "Profile the search endpoint",
  "Add dark mode toggle",
  "Migrate avatars to the CDN",
  "Triage last week's bugs",
  "Pair on the billing webhook",
  "Update the API docs",
];
const MAX_MESSAGES = 200;

function isLoopback(req: IncomingMessage): boolean {
  const a = req.socket.remoteAddress ?? "";
  return a === "127.0.0.1" || a === "::1" || a === "::ffff:127.0.0.1";
}

function isLoopbackUrl(url: string): boolean {
  try {
    const u = new URL(url);
    return (u.protocol === "http:" || u.protocol === "https:") && ["127.0.0.1", "localhost", "[::1]"].includes(u.hostname);
  } catch {
    return false;
  }
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > 64 * 1024) throw new Error("body too large");
    chunks.push(chunk as Buffer);
  }
  if (chunks.length === 0) return {};
  const parsed: unknown = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  return parsed && typeof parsed === "object" ? (parsed as Record<string, unknown>) : {};
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.statusCode = status;
  res.setHeader("content-type", typeof body === "string" ? "text/plain; charset=utf-8" : "application/json");
  res.setHeader("cache-control", "no-store");
  res.end(typeof body === "string" ? body : JSON.stringify(body));
}

const str = (v: unknown, fallback = ""): string => (typeof v === "string" && v ? v : fallback);
const list = (v: string | null): string[] => (v ? v.split(",").map((s) => s.trim()).filter(Boolean) : []);

/** The plugin. Add it to `plugins` in the demo's vite.config.ts. */
export function lamplightDevBackend(options: DevBackendOptions = {}): Plugin {
  const defaultUrl = options.lamplightUrl ?? process.env.LAMPLIGHT_URL ?? "http://127.0.0.1:50051";
  const clients = new Map<string, Client<typeof EventService>>();
  const tasks = new Map<string, TaskRecord>();
  const messages = new Map<string, MessageRecord[]>();
  const publisherToken = () => mintDevToken({ sub: "demo-backend", roles: ["publisher"], ttlSecs: 600 });

  const client = (url: string) => {
    let c = clients.get(url);
    if (!c) {
      // The page may say `localhost`; lamplight listens on IPv4 by default, so skip the ::1 attempt.
      const target = new URL(url);
      if (target.hostname === "localhost") target.hostname = "127.0.0.1";
      c = createClient(EventService, createGrpcTransport({ baseUrl: target.origin }));
      clients.set(url, c);
    }
    return c;
  };

  const publish = async (server: string, room: string, type: string, payload: Payload): Promise<string> => {
    const res = await client(server).publish(
      { event: { room, type, payload } },
      { headers: { authorization: `Bearer ${publisherToken()}` }, timeoutMs: 5000 },
    );
    return res.id;
  };

  const publishTask = (server: string, type: string, task: TaskRecord) =>
    publish(server, `tenant:${task.tenantId}:project:${task.projectId}`, type, { case: "task", value: { ...task } });

  const createTask = async (server: string, tenantId: string, projectId: string, by: string, title?: string) => {
    const task: TaskRecord = {
      id: `task-${randomUUID().slice(0, 8)}`,
      projectId,
      tenantId,
      title: title || TITLES[Math.floor(Math.random() * TITLES.length)]!,
      status: "todo",
      priority: ["low", "medium", "high"][Math.floor(Math.random() * 3)]!,
      createdById: by,
    };
    tasks.set(task.id, task);
    await publishTask(server, "task.created", task);
    return task;
  };

  const handle = async (req: IncomingMessage, res: ServerResponse, next: () => void) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    if (!url.pathname.startsWith("/dev-token") && !url.pathname.startsWith("/dev-api/")) return next();
    if (!isLoopback(req)) return send(res, 403, "development endpoints answer loopback clients only");
    try {
      if (url.pathname === "/dev-token" && req.method === "GET") {
        const sub = url.searchParams.get("sub");
        if (!sub || !/^[A-Za-z0-9_.-]{1,64}$/.test(sub)) return send(res, 400, "sub is required ([A-Za-z0-9_.-])");
        const token = mintDevToken({
          sub,
          tid: url.searchParams.get("tid") ?? "t1",
          projects: list(url.searchParams.get("projects")),
          channels: list(url.searchParams.get("channels")),
          ttlSecs: Number(url.searchParams.get("ttl")) || 3600,
        });
        return send(res, 200, token);
      }
      const body = req.method === "POST" ? await readJson(req) : {};
      const server = str(body.server ?? url.searchParams.get("server"), defaultUrl);
      if (!isLoopbackUrl(server)) return send(res, 400, "server must be a loopback URL in development");
      const tenantId = str(body.tenantId ?? url.searchParams.get("tenant"), "t1");

      if (url.pathname === "/dev-api/tasks" && req.method === "GET") {
        const projectId = str(url.searchParams.get("project"), "p1");
        return send(res, 200, [...tasks.values()].filter((t) => t.projectId === projectId && t.tenantId === tenantId));
      }
      if (url.pathname === "/dev-api/tasks" && req.method === "POST") {
        const action = str(body.action);
        const by = str(body.userId, "someone");
        if (action === "create") {
          return send(res, 200, await createTask(server, tenantId, str(body.projectId, "p1"), by, str(body.title)));
        }
        const task = tasks.get(str(body.id));
        if (!task) return send(res, 404, "no such task (the dev backend only knows tasks created through it)");
        if (action === "move") {
          const i = STATUSES.indexOf(task.status);
          task.status = STATUSES[Math.min(STATUSES.length - 1, i + 1)]!;
          await publishTask(server, "task.updated", task);
          return send(res, 200, task);
        }
        if (action === "delete") {
          tasks.delete(task.id);
          await publishTask(server, "task.deleted", task);
          return send(res, 200, task);
        }
        return send(res, 400, "action must be create, move or delete");
      }
      if (url.pathname === "/dev-api/messages" && req.method === "GET") {
        const channelId = str(url.searchParams.get("channel"), "general");
        return send(res, 200, messages.get(`${tenantId}/${channelId}`) ?? []);
      }
      if (url.pathname === "/dev-api/messages" && req.method === "POST") {
        const channelId = str(body.channelId, "general");
        const text = str(body.body).slice(0, 2000);
        if (!text) return send(res, 400, "body is required");
        const msg: MessageRecord = {
          id: `msg-${randomUUID().slice(0, 8)}`,
          channelId,
          tenantId,
          authorId: str(body.userId, "someone"),
          body: text,
          at: Date.now(),
        };
        const key = `${tenantId}/${channelId}`;
        const stored = messages.get(key) ?? [];
        stored.push(msg);
        messages.set(key, stored.slice(-MAX_MESSAGES));
        const { at: _at, ...wire } = msg;
        await publish(server, `tenant:${tenantId}:channel:${channelId}`, "message.created", { case: "message", value: wire });
        return send(res, 200, msg);
      }
      if (url.pathname === "/dev-api/simulate" && req.method === "POST") {
        const projectId = str(body.projectId, "p1");
        void simulate(server, tenantId, projectId);
        return send(res, 202, { started: true });
      }
      return send(res, 404, "unknown development endpoint");
    } catch (err) {
      return send(res, 502, `dev backend: ${err instanceof Error ? err.message : String(err)}`);
    }
  };

  /** A burst of activity on the board: a few tasks created, moved along, one finished and removed. */
  const simulate = async (server: string, tenantId: string, projectId: string) => {
    const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const actors = ["linus", "margaret", "barbara"];
    try {
      const created: TaskRecord[] = [];
      for (const who of actors) {
        created.push(await createTask(server, tenantId, projectId, who));
        await pause(700);
      }
      for (const task of created) {
        task.status = "in_progress";
        await publishTask(server, "task.updated", task);
        await pause(700);
      }
      const done = created[0]!;
      done.status = "done";
      await publishTask(server, "task.updated", done);
      await pause(1500);
      tasks.delete(done.id);
      await publishTask(server, "task.deleted", done);
    } catch (err) {
      console.warn(`[lamplight dev backend] simulation stopped: ${String(err)}`);
    }
  };

  return {
    name: "lamplight-dev-backend",
    configureServer(server) {
      server.middlewares.use((req, res, next) => void handle(req, res, next));
    },
    configurePreviewServer(server) {
      server.middlewares.use((req, res, next) => void handle(req, res, next));
    },
  };
}
