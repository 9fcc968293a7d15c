/**
 * A loopback TCP proxy that can *freeze* the connections it carries: bytes stop flowing both ways but the
 * sockets stay open, which is what a dead NAT entry or a wedged proxy looks like to a client. Only a
 * watchdog notices that; a closed socket would be noticed by the transport itself.
 */

import { createServer, connect, type Server, type Socket } from "node:net";

export interface FreezingProxy {
  readonly port: number;
  readonly url: string;
  /** Connections accepted so far. */
  connections(): number;
  /** Stops forwarding on every connection open now (new connections are forwarded normally). */
  freezeOpenConnections(): void;
  close(): Promise<void>;
}

export async function startProxy(targetPort: number): Promise<FreezingProxy> {
  const open = new Set<{ client: Socket; upstream: Socket; frozen: boolean }>();
  let accepted = 0;
  const server: Server = createServer((client) => {
    accepted += 1;
    const upstream = connect(targetPort, "127.0.0.1");
    const pair = { client, upstream, frozen: false };
    open.add(pair);
    client.on("data", (d) => {
      if (!pair.frozen) upstream.write(d);
    });
    upstream.on("data", (d) => {
      if (!pair.frozen) client.write(d);
    });
    const end = () => {
      open.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    // A frozen pair swallows closes too: the client must find out by itself.
    client.on("close", end);
    upstream.on("close", () => {
      if (!pair.frozen) end();
    });
    client.on("error", end);
    upstream.on("error", () => {
      if (!pair.frozen) end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    connections: () => accepted,
    freezeOpenConnections() {
      for (const pair of open) pair.frozen = true;
    },
    close() {
      for (const pair of open) {
        pair.client.destroy();
        pair.upstream.destroy();
      }
      open.clear();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
