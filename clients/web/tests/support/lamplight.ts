/**
 * Real lamplight servers for the tests: the binary built by `cargo build`, on a free loopback port,
 * ready once it logs that it is listening. Plus tokens, a gRPC publisher, and private Redis servers.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";

import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { devSecret, mintDevToken, type DevClaims } from "../../demo/server/token.js";
import { AdminService, EventService } from "../../src/gen/lamplight/v1/events_pb.js";

/** Task fields a test sets. */
export interface TaskFields {
  id: string;
  title?: string;
  status?: string;
  priority?: string;
  projectId?: string;
  tenantId?: string;
  createdById?: string;
}
import { LAMPLIGHT_BIN, REDIS_SERVER, requireLamplight } from "./env.js";

/** A free TCP port on 127.0.0.1 (released before returning; the caller binds it next). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves when `proc` prints a line containing `marker`; rejects on exit or timeout, with its output. */
function waitForOutput(proc: ChildProcess, marker: string, timeoutMs: number, what: string, log: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    let buffered = "";
    const onData = (chunk: Buffer) => {
      const text = chunk.toString("utf8");
      log.push(text);
      buffered += text;
      if (buffered.includes(marker)) finish();
      buffered = buffered.slice(-4096);
    };
    const onExit = (code: number | null, signal: string | null) =>
      finish(new Error(`${what} exited (code ${code}, signal ${signal}) before it was ready:\n${log.join("")}`));
    const timer = setTimeout(
      () => finish(new Error(`${what} not ready after ${timeoutMs} ms:\n${log.join("")}`)),
      timeoutMs,
    );
    const finish = (err?: Error) => {
      clearTimeout(timer);
      proc.stdout?.off("data", onData);
      proc.stderr?.off("data", onData);
      proc.off("exit", onExit);
      // Keep draining so a chatty child never blocks on a full pipe.
      proc.stdout?.on("data", (c: Buffer) => keep(log, c));
      proc.stderr?.on("data", (c: Buffer) => keep(log, c));
      if (err) reject(err);
      else resolve();
    };
    proc.stdout?.on("data", onData);
    proc.stderr?.on("data", onData);
    proc.once("exit", onExit);
  });
}

function keep(log: string[], chunk: Buffer) {
  log.push(chunk.toString("utf8"));
  if (log.length > 2000) log.splice(0, log.length - 1000);
}

function exited(proc: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    proc.once("exit", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** Options of {@link startLamplight}. */
export interface LamplightOptions {
  port?: number;
  heartbeatSecs?: number;
  corsOrigins?: string[];
  redisUrl?: string;
  /** Serve TLS on the port (`--tls-cert-file`, `--tls-key-file`): `url` is then `https://`. */
  tls?: { certFile: string; keyFile: string };
  extraArgs?: string[];
}

/** A running lamplight. */
export interface LamplightServer {
  readonly port: number;
  /** http://127.0.0.1:PORT (https:// with `tls`): gRPC and grpc-web. */
  readonly url: string;
  readonly pid: number | undefined;
  /** Everything it printed. */
  output(): string;
  /** SIGTERM (graceful: streams end UNAVAILABLE), then SIGKILL if it lingers. */
  stop(): Promise<void>;
  /** SIGKILL: the process dies without a word, as in a crash. */
  kill(): Promise<void>;
}

/** Starts lamplight and waits until it listens. */
export async function startLamplight(options: LamplightOptions = {}): Promise<LamplightServer> {
  requireLamplight();
  const port = options.port ?? (await freePort());
  const args = [
    "--listen",
    `127.0.0.1:${port}`,
    "--heartbeat-secs",
    String(options.heartbeatSecs ?? 1),
    "--log-format",
    "json",
    "--shutdown-grace-secs",
    "2",
  ];
  if (options.corsOrigins?.length) args.push("--cors-origins", options.corsOrigins.join(","));
  if (options.redisUrl) args.push("--redis-url", options.redisUrl);
  if (options.tls) args.push("--tls-cert-file", options.tls.certFile, "--tls-key-file", options.tls.keyFile);
  args.push(...(options.extraArgs ?? []));
  // The secret the tests (and the demo's dev backend) mint with; nothing else from the environment that
  // lamplight reads (LAMPLIGHT_*, REDIS_URL) leaks in: a memory-bus test must never reach a shared Redis.
  args.push("--jwt-secret", devSecret());
  const env: NodeJS.ProcessEnv = { RUST_LOG: process.env.LAMPLIGHT_TEST_LOG ?? "info" };
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith("LAMPLIGHT_") && k !== "REDIS_URL" && k !== "RUST_LOG") env[k] = v;
  }
  const proc = spawn(LAMPLIGHT_BIN, args, { stdio: ["ignore", "pipe", "pipe"], env });
  const log: string[] = [];
  await waitForOutput(proc, "lamplight listening", 30_000, `lamplight on port ${port}`, log);
  return {
    port,
    url: `${options.tls ? "https" : "http"}://127.0.0.1:${port}`,
    pid: proc.pid,
    output: () => log.join(""),
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGTERM");
      if (!(await exited(proc, 10_000))) {
        proc.kill("SIGKILL");
        await exited(proc, 5_000);
      }
    },
    async kill() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill("SIGKILL");
      await exited(proc, 5_000);
    },
  };
}

/** Whether this lamplight build has a flag (e.g. `--redis-url`). */
export async function lamplightHasFlag(flag: string): Promise<boolean> {
  requireLamplight();
  const proc = spawn(LAMPLIGHT_BIN, ["--help"], { stdio: ["ignore", "pipe", "pipe"] });
  const out: string[] = [];
  proc.stdout.on("data", (c: Buffer) => out.push(c.toString()));
  await exited(proc, 10_000);
  return out.join("").includes(flag);
}

/** A user token (email verified) signed with the development secret lamplight uses by default. */
export function userToken(claims: DevClaims): string {
  return mintDevToken({ tid: "t1", ...claims });
}

/** A service token with role `publisher`. */
export function publisherToken(sub = "e2e-publisher"): string {
  return mintDevToken({ sub, roles: ["publisher"] });
}

/** Publishes over real gRPC (HTTP/2) with a publisher token. */
export class Publisher {
  readonly client: Client<typeof EventService>;
  private readonly token = publisherToken();

  /** `caPem`: the CA to trust for an `https://` url (the test's own; never the system store alone). */
  constructor(url: string, caPem?: string) {
    this.client = createClient(
      EventService,
      createGrpcTransport({ baseUrl: url, ...(caPem ? { nodeOptions: { ca: caPem } } : {}) }),
    );
  }

  /** Publishes a task event; returns the event id. */
  async task(room: string, type: string, task: TaskFields, idempotencyKey = ""): Promise<string> {
    const res = await this.client.publish(
      { event: { room, type, payload: { case: "task", value: task } }, idempotencyKey },
      { headers: { authorization: `Bearer ${this.token}` }, timeoutMs: 5000 },
    );
    return res.id;
  }
}

/** `AdminService` over real gRPC (HTTP/2) with a publisher token: membership changes on live streams. */
export class Admin {
  readonly client: Client<typeof AdminService>;
  private readonly token = publisherToken("e2e-admin");

  constructor(url: string) {
    this.client = createClient(AdminService, createGrpcTransport({ baseUrl: url }));
  }

  private get options() {
    return { headers: { authorization: `Bearer ${this.token}` }, timeoutMs: 5000 };
  }

  /** Takes `room` off every open stream of `user` (tenant t1 unless given). */
  async unsubscribe(user: string, room: string, reason: string, tenantId = "t1"): Promise<void> {
    await this.client.unsubscribe({ user: { tenantId, userId: user }, room, reason }, this.options);
  }

  /** Ends every open stream of `user` with PERMISSION_DENIED. */
  async disconnect(user: string, reason: string, tenantId = "t1"): Promise<void> {
    await this.client.disconnect({ user: { tenantId, userId: user }, reason }, this.options);
  }

  /** Refuses `user`'s tokens issued before `issuedBefore` (Unix seconds). */
  async revokeTokens(user: string, issuedBefore: number, reason: string, tenantId = "t1"): Promise<void> {
    await this.client.revokeTokens(
      { user: { tenantId, userId: user }, issuedBefore: { seconds: BigInt(issuedBefore), nanos: 0 }, reason },
      this.options,
    );
  }
}

/** A private Redis (never the shared one on 6379): no persistence, stopped by the test. */
export interface RedisServer {
  readonly port: number;
  readonly url: string;
  stop(): Promise<void>;
}

export async function startRedis(): Promise<RedisServer> {
  const port = await freePort();
  const proc = spawn(REDIS_SERVER, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  proc.once("error", () => undefined);
  const log: string[] = [];
  await waitForOutput(proc, "Ready to accept connections", 15_000, `redis-server on port ${port} (apt-get install -y redis-server)`, log);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      proc.kill("SIGTERM");
      if (!(await exited(proc, 5_000))) proc.kill("SIGKILL");
    },
  };
}

/** Resolves when `check()` is true; rejects with `what` after `timeoutMs`. Event-driven callers are preferred. */
export function until(check: () => boolean, timeoutMs: number, what: string, subscribe: (notify: () => void) => () => void): Promise<void> {
  return new Promise((resolve, reject) => {
    if (check()) return resolve();
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
    const off = subscribe(() => {
      if (!check()) return;
      clearTimeout(timer);
      off();
      resolve();
    });
  });
}
