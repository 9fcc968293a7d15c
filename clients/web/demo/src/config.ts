/**
 * Demo settings, from the page's query string so two windows can be two people:
 * `?user=ada`, `&server=http://localhost:50051`, `&heartbeat=25` (the server's --heartbeat-secs),
 * `&backoffMax=30000` (ms), `&tenant=t1`, `&project=p1`.
 */

const params = new URLSearchParams(location.search);

const PEOPLE = ["ada", "grace", "alan", "katherine", "edsger", "radia", "dennis", "frances"];

function defaultUser(): string {
  // One person per tab: remembered for the tab, different across tabs.
  const saved = sessionStorage.getItem("lamplight-demo-user");
  if (saved) return saved;
  const pick = PEOPLE[Math.floor(Math.random() * PEOPLE.length)]!;
  sessionStorage.setItem("lamplight-demo-user", pick);
  return pick;
}

const num = (name: string, fallback: number) => {
  const v = Number(params.get(name));
  return Number.isFinite(v) && v > 0 ? v : fallback;
};

export const config = {
  server: params.get("server") ?? (import.meta.env.VITE_LAMPLIGHT_URL as string | undefined) ?? `http://${location.hostname}:50051`,
  user: params.get("user") ?? defaultUser(),
  tenant: params.get("tenant") ?? "t1",
  project: params.get("project") ?? "p1",
  heartbeatMs: num("heartbeat", 25) * 1000,
  backoffMaxMs: num("backoffMax", 30_000),
  /** Channels shown; the token grants all but `secret`, to show how a refused join looks. */
  channels: [
    { id: "general", label: "general", granted: true },
    { id: "random", label: "random", granted: true },
    { id: "secret", label: "secret", granted: false },
  ],
};

/**
 * The token, from the development-only endpoint of the Vite server (the page never sees the secret).
 * `signal` is the client's: aborted when it stops waiting (after `tokenTimeoutMs`, on close or Retry).
 */
export async function fetchToken({ signal }: { signal?: AbortSignal } = {}): Promise<string> {
  const q = new URLSearchParams({
    sub: config.user,
    tid: config.tenant,
    projects: config.project,
    channels: config.channels.filter((c) => c.granted).map((c) => c.id).join(","),
  });
  const res = await fetch(`/dev-token?${q}`, { signal });
  if (!res.ok) throw new Error(`dev token: ${res.status} ${await res.text()}`);
  return res.text();
}

/** Calls the development backend (which publishes to lamplight over gRPC). */
export async function devApi<T>(path: string, body?: Record<string, unknown>): Promise<T> {
  const init: RequestInit = body
    ? {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ server: config.server, tenantId: config.tenant, userId: config.user, ...body }),
      }
    : {};
  const sep = path.includes("?") ? "&" : "?";
  const url = body ? path : `${path}${sep}${new URLSearchParams({ server: config.server, tenant: config.tenant })}`;
  const res = await fetch(url, init);
  if (!res.ok) throw new Error(await res.text());
  return (await res.json()) as T;
}
