/**
 * A page for the e2e tests of the React bindings: `<LamplightProvider>` with options the test changes
 * from outside (`window.harness.render(...)`), under StrictMode as apps run it in development, with
 * `<ConnectionStatus/>` and a probe that reports what the hooks see.
 */

import { StrictMode, useEffect, type ReactNode } from "react";
import { createRoot } from "react-dom/client";

import type { Lamplight, TokenContext } from "../../src/index.js";
import { ConnectionStatus, LamplightProvider, useLamplight } from "../../src/react/index.js";

/** A token source the test defines: hands out `tokens` in turn (the last one repeats). */
export interface SourceSpec {
  tokens: string[];
  /** Calls never answer while set (a token endpoint that hangs); see `setHanging`. */
  hanging?: boolean;
}

/** Provider options the test sets. */
export interface HarnessProps {
  baseUrl: string;
  /** Name of a source given to `defineSource`. */
  source: string;
  tokenTimeoutMs?: number;
  /** Default 1000. */
  heartbeatIntervalMs?: number;
}

export interface Seen {
  state: string;
  userId: string | undefined;
  /** Distinct clients the hooks have seen so far; the current one is the last. */
  clients: number;
  /** Rooms the current client's last `Subscribed` said were recovered from a `since`. */
  recovered: string[];
}

interface Harness {
  defineSource(name: string, spec: SourceSpec): void;
  /** Calls made from now on hang, or answer again (those already hanging never answer). */
  setHanging(name: string, hanging: boolean): void;
  /** Token requests per source. */
  calls(name: string): number;
  render(props: HarnessProps): void;
  seen(): Seen;
  /** The current client's resume position in a room. */
  cursor(room: string): string | undefined;
}

const sources = new Map<string, (context: TokenContext) => Promise<string>>();
const calls = new Map<string, number>();
const hanging = new Map<string, boolean>();
const clientIds = new Map<Lamplight, number>();
let currentClient: Lamplight | undefined;
let seen: Seen = { state: "none", userId: undefined, clients: 0, recovered: [] };
let recovered: string[] = [];

function Probe(): ReactNode {
  const { client, state, identity } = useLamplight();
  if (!clientIds.has(client)) clientIds.set(client, clientIds.size + 1);
  currentClient = client;
  useEffect(
    () =>
      client.on("subscribed", (rooms) => {
        recovered = rooms.filter((r) => r.recovered).map((r) => r.room).sort();
        seen = { ...seen, recovered };
      }),
    [client],
  );
  useEffect(() => {
    seen = { state, userId: identity?.userId, clients: clientIds.size, recovered };
    document.body.dataset.state = state;
  });
  return <p data-testid="probe">{`${state} ${identity?.userId ?? "-"} client#${clientIds.get(client)}`}</p>;
}

const root = createRoot(document.getElementById("root")!);

const harness: Harness = {
  defineSource(name, spec) {
    calls.set(name, 0);
    hanging.set(name, spec.hanging ?? false);
    sources.set(name, () => {
      const n = (calls.get(name) ?? 0) + 1;
      calls.set(name, n);
      if (hanging.get(name)) return new Promise<string>(() => undefined);
      return Promise.resolve(spec.tokens[Math.min(n, spec.tokens.length) - 1]!);
    });
  },
  setHanging: (name, value) => void hanging.set(name, value),
  calls: (name) => calls.get(name) ?? 0,
  render(props) {
    const getToken = sources.get(props.source);
    if (!getToken) throw new Error(`no source ${props.source}`);
    root.render(
      <StrictMode>
        <LamplightProvider
          baseUrl={props.baseUrl}
          getToken={getToken}
          heartbeatIntervalMs={props.heartbeatIntervalMs ?? 1000}
          autoJoinUserRooms={true}
          backoff={{ initialMs: 50, maxMs: 400 }}
          tokenTimeoutMs={props.tokenTimeoutMs}
        >
          <Probe />
          <ConnectionStatus />
        </LamplightProvider>
      </StrictMode>,
    );
  },
  seen: () => seen,
  cursor: (room) => currentClient?.cursors()[room],
};

(globalThis as unknown as { harness: Harness }).harness = harness;
document.body.dataset.ready = "1";
