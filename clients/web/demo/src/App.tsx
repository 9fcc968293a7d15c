import { useQuery } from "@tanstack/react-query";
import { useEffect, useRef, useState, type FormEvent, type ReactNode } from "react";

import { packedIds, tenantRoom, type Event, type Task } from "../../src/index.js";
import {
  ConnectionStatus,
  useLamplight,
  usePresence,
  useRealTimeUpdates,
  useTyping,
} from "../../src/react/index.js";
import { config, devApi } from "./config.js";

const COLUMNS = [
  { status: "todo", title: "To do" },
  { status: "in_progress", title: "In progress" },
  { status: "done", title: "Done" },
];
/** How long the "new" / "updated" highlight stays on a card (seed 20.4). */
const HIGHLIGHT_MS = 6_000;

export function App(): ReactNode {
  const { state, identity } = useLamplight();
  return (
    <div className="app">
      <header>
        <div className="brand">
          <Lamp />
          <div>
            <h1>Project Apollo</h1>
            <small>a live board on lamplight</small>
          </div>
        </div>
        <div className="me">
          <Avatar name={config.user} />
          <span>
            signed in as <b data-testid="me">{identity?.userId ?? config.user}</b>
          </span>
          <span className={`state state-${state}`} data-testid="connection-state" data-state={state}>
            {state}
          </span>
        </div>
      </header>
      <main>
        <Board />
        <aside>
          <Online />
          <Channel />
        </aside>
      </main>
      <Activity />
      <ConnectionStatus />
    </div>
  );
}

// ---- board ----

type Highlight = "new" | "updated";

function Board(): ReactNode {
  const [tasks, setTasks] = useState<Map<string, Task>>(new Map());
  const [highlight, setHighlight] = useState<Map<string, Highlight>>(new Map());
  const [notice, setNotice] = useState<string | undefined>();
  const [busy, setBusy] = useState(false);
  const deleted = useRef(new Set<string>());
  const timers = useRef(new Map<string, ReturnType<typeof setTimeout>>());

  const mark = (id: string, kind: Highlight) => {
    setHighlight((h) => new Map(h).set(id, kind));
    clearTimeout(timers.current.get(id));
    timers.current.set(
      id,
      setTimeout(() => {
        setHighlight((h) => {
          const next = new Map(h);
          next.delete(id);
          return next;
        });
      }, HIGHLIGHT_MS),
    );
  };

  const load = () =>
    devApi<Task[]>(`/dev-api/tasks?project=${encodeURIComponent(config.project)}`)
      .then((fetched) =>
        setTasks((live) => {
          // Live events win over the snapshot; tasks deleted live stay deleted.
          const next = new Map<string, Task>();
          for (const t of fetched) if (!deleted.current.has(t.id)) next.set(t.id, t);
          for (const [id, t] of live) next.set(id, t);
          return next;
        }),
      )
      .catch((err: Error) => setNotice(`Could not load the board: ${err.message}`));

  useEffect(() => {
    void load();
    const all = timers.current;
    return () => all.forEach((t) => clearTimeout(t));
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, []);

  const upsert = (task: Task) => {
    deleted.current.delete(task.id);
    setTasks((m) => new Map(m).set(task.id, task));
  };

  const { joinError } = useRealTimeUpdates({
    projectId: config.project,
    onTaskCreated: (task) => {
      upsert(task);
      mark(task.id, "new");
    },
    onTaskUpdated: (task) => {
      upsert(task);
      mark(task.id, "updated");
    },
    onTaskDeleted: (task) => {
      deleted.current.add(task.id);
      setTasks((m) => {
        const next = new Map(m);
        next.delete(task.id);
        return next;
      });
    },
    onReset: (reset) => {
      setNotice(`Some updates were missed (${reset.reason}); the board was reloaded.`);
      void load();
    },
  });

  const act = (body: Record<string, unknown>) => {
    setBusy(true);
    devApi("/dev-api/tasks", body)
      .catch((err: Error) => setNotice(err.message))
      .finally(() => setBusy(false));
  };

  return (
    <section className="board" data-testid="board">
      <div className="board-head">
        <h2>Board</h2>
        <div className="actions">
          <button type="button" disabled={busy} onClick={() => act({ action: "create", projectId: config.project })}>
            + Add task
          </button>
          <button
            type="button"
            className="ghost"
            onClick={() => void devApi("/dev-api/simulate", { projectId: config.project }).catch((e: Error) => setNotice(e.message))}
          >
            Simulate activity
          </button>
        </div>
      </div>
      {joinError ? <div className="error">{joinError.message}</div> : null}
      {notice ? (
        <div className="notice" onClick={() => setNotice(undefined)}>
          {notice}
        </div>
      ) : null}
      <div className="columns">
        {COLUMNS.map((col) => {
          const items = [...tasks.values()].filter((t) =>
            col.status === "todo" ? !COLUMNS.some((c) => c.status === t.status) || t.status === "todo" : t.status === col.status,
          );
          return (
            <div className="column" key={col.status} data-column={col.status}>
              <h3>
                {col.title} <span className="count">{items.length}</span>
              </h3>
              {items.length === 0 ? <p className="empty">Nothing here yet</p> : null}
              {items.map((task) => (
                <TaskCard
                  key={task.id}
                  task={task}
                  highlight={highlight.get(task.id)}
                  onMove={() => act({ action: "move", id: task.id })}
                  onDelete={() => act({ action: "delete", id: task.id })}
                />
              ))}
            </div>
          );
        })}
      </div>
    </section>
  );
}

function TaskCard(props: { task: Task; highlight: Highlight | undefined; onMove: () => void; onDelete: () => void }): ReactNode {
  const { task, highlight } = props;
  return (
    <article className={`card ${highlight ?? ""}`} data-testid="task-card" data-task-id={task.id} data-status={task.status}>
      {highlight ? <span className={`badge ${highlight}`}>{highlight === "new" ? "NEW" : "UPDATED"}</span> : null}
      <div className="title">{task.title || task.id}</div>
      <div className="meta">
        {task.priority ? <span className={`prio prio-${task.priority}`}>{task.priority}</span> : null}
        {task.createdById ? (
          <span className="by">
            <Avatar name={task.createdById} small /> {task.createdById}
          </span>
        ) : null}
        <span className="card-actions">
          {task.status !== "done" ? (
            <button type="button" title="Move to the next column" onClick={props.onMove}>
              →
            </button>
          ) : null}
          <button type="button" title="Delete" onClick={props.onDelete}>
            ✕
          </button>
        </span>
      </div>
    </article>
  );
}

// ---- who is online ----

function Online(): ReactNode {
  const { identity } = useLamplight();
  const room = identity?.tenantId ? tenantRoom(identity.tenantId) : undefined;
  const { userIds, connectionCount } = usePresence(room);
  return (
    <section className="panel online" data-testid="online">
      <h2>
        Online <span className="count">{userIds.length}</span>
      </h2>
      <ul>
        {userIds.map((u) => (
          <li key={u} data-user={u}>
            <Avatar name={u} small />
            <span>{u}</span>
            {u === identity?.userId ? <em>you</em> : null}
            <i className="dot" />
          </li>
        ))}
      </ul>
      <small className="muted">
        {connectionCount} open {connectionCount === 1 ? "stream" : "streams"}
      </small>
    </section>
  );
}

// ---- channel ----

interface ChatMessage {
  id: string;
  authorId: string;
  body: string;
  at: number;
}

function Channel(): ReactNode {
  const [channel, setChannel] = useState("general");
  const [draft, setDraft] = useState("");
  const [sendError, setSendError] = useState<string | undefined>();
  const { joinError } = useRealTimeUpdates({ channelId: channel, autoInvalidateQueries: true });
  const { typingUsers, notifyTyping, setTyping } = useTyping(joinError ? undefined : channel);
  const messages = useQuery({
    queryKey: ["messages", channel],
    queryFn: () => devApi<ChatMessage[]>(`/dev-api/messages?channel=${encodeURIComponent(channel)}`),
    enabled: !joinError,
  });
  const listRef = useRef<HTMLDivElement>(null);
  useEffect(() => {
    listRef.current?.scrollTo({ top: listRef.current.scrollHeight });
  }, [messages.data]);

  const submit = (e: FormEvent) => {
    e.preventDefault();
    const body = draft.trim();
    if (!body) return;
    setDraft("");
    setTyping(false);
    devApi("/dev-api/messages", { channelId: channel, body }).then(
      () => setSendError(undefined),
      (err: Error) => setSendError(err.message),
    );
  };

  return (
    <section className="panel channel" data-testid="channel" data-channel={channel}>
      <div className="tabs" role="tablist">
        {config.channels.map((c) => (
          <button
            key={c.id}
            type="button"
            role="tab"
            aria-selected={c.id === channel}
            className={c.id === channel ? "active" : ""}
            data-channel-tab={c.id}
            onClick={() => setChannel(c.id)}
          >
            #{c.label}
            {c.granted ? null : <Lock />}
          </button>
        ))}
      </div>
      {joinError ? (
        <div className="error" data-testid="join-error">
          <Lock /> {joinError.message}
        </div>
      ) : (
        <>
          <div className="messages" ref={listRef} data-testid="messages">
            {messages.data?.length ? null : <p className="empty">No messages yet. Say hello!</p>}
            {messages.data?.map((m) => (
              <div key={m.id} className={`msg ${m.authorId === config.user ? "mine" : ""}`} data-testid="message">
                <Avatar name={m.authorId} small />
                <div>
                  <b>{m.authorId}</b> <time>{new Date(m.at).toLocaleTimeString()}</time>
                  <p>{m.body}</p>
                </div>
              </div>
            ))}
          </div>
          <div className="typing" data-testid="typing" aria-live="polite">
            {typingLine(typingUsers)}
          </div>
          <form onSubmit={submit}>
            <input
              data-testid="message-input"
              placeholder={`Message #${channel}`}
              value={draft}
              onChange={(e) => {
                setDraft(e.target.value);
                if (e.target.value) notifyTyping();
                else setTyping(false);
              }}
            />
            <button type="submit">Send</button>
          </form>
          {sendError ? <div className="error">{sendError}</div> : null}
        </>
      )}
    </section>
  );
}

function typingLine(users: string[]): string {
  if (users.length === 0) return "";
  if (users.length === 1) return `${users[0]} is typing…`;
  if (users.length === 2) return `${users[0]} and ${users[1]} are typing…`;
  return `${users.length} people are typing…`;
}

// ---- activity feed ----

interface Entry {
  key: string;
  id: string;
  room: string;
  type: string;
  summary: string;
  at: Date;
}

const MAX_ACTIVITY = 100;

function summarize(e: Event): string {
  const p = e.payload;
  switch (p.case) {
    case "task":
      return p.value.title || p.value.id;
    case "message":
      return `${p.value.authorId}: ${p.value.body}`;
    case "userStatus":
      return p.value.userId;
    case "presenceDiff":
      return [...packedIds(p.value.online), ...packedIds(p.value.offline)].join(", ");
    case "typing":
      return `${p.value.userId} ${p.value.isTyping ? "started" : "stopped"} typing`;
    case "notification":
      return p.value.title;
    default:
      return "";
  }
}

function Activity(): ReactNode {
  const { client } = useLamplight();
  const [entries, setEntries] = useState<Entry[]>([]);
  useEffect(() => {
    let n = 0;
    const offEvent = client.on("event", (e) => {
      if (e.payload.case === "typing") return; // too chatty for a feed
      const entry: Entry = { key: `${e.id}#${n++}`, id: e.id, room: e.room, type: e.type, summary: summarize(e), at: new Date() };
      setEntries((list) => [entry, ...list].slice(0, MAX_ACTIVITY));
    });
    const offReset = client.on("reset", (r) => {
      const entry: Entry = { key: `reset#${n++}`, id: "", room: r.room, type: "reset", summary: r.reason, at: new Date() };
      setEntries((list) => [entry, ...list].slice(0, MAX_ACTIVITY));
    });
    return () => {
      offEvent();
      offReset();
    };
  }, [client]);
  return (
    <section className="panel activity" data-testid="activity">
      <h2>Activity</h2>
      {entries.length === 0 ? <p className="empty">Events show up here as they arrive.</p> : null}
      <ol>
        {entries.map((e) => (
          <li key={e.key} data-event-id={e.id} data-type={e.type}>
            <time>{e.at.toLocaleTimeString()}</time>
            <code>{e.type}</code>
            <span className="summary">{e.summary}</span>
            <span className="room">{e.room}</span>
          </li>
        ))}
      </ol>
    </section>
  );
}

// ---- bits ----

/** The logo: a small oil lamp with a flame (inline SVG: no emoji font needed). */
function Lamp(): ReactNode {
  return (
    <svg className="logo" width="38" height="38" viewBox="0 0 64 64" aria-hidden>
      <path d="M32 6c6 9 9 14 9 19a9 9 0 0 1-18 0c0-5 3-10 9-19z" fill="#f6a623" />
      <path d="M32 16c3 5 4.5 7.5 4.5 10a4.5 4.5 0 0 1-9 0c0-2.5 1.5-5 4.5-10z" fill="#ffe08a" />
      <path d="M8 38h48c0 9-10 16-24 16S8 47 8 38z" fill="#b5651d" />
      <path d="M20 54h24l-3 5H23z" fill="#8a4b16" />
      <ellipse cx="32" cy="38" rx="24" ry="3" fill="#d9822b" />
    </svg>
  );
}

function Lock(): ReactNode {
  return (
    <svg className="lock" width="12" height="12" viewBox="0 0 16 16" aria-label="locked">
      <rect x="3" y="7" width="10" height="8" rx="1.5" fill="currentColor" />
      <path d="M5 7V5a3 3 0 0 1 6 0v2" stroke="currentColor" strokeWidth="1.8" fill="none" />
    </svg>
  );
}

function Avatar({ name, small }: { name: string; small?: boolean }): ReactNode {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) % 360;
  return (
    <span className={`avatar ${small ? "small" : ""}`} style={{ background: `hsl(${hash} 65% 55%)` }} aria-hidden>
      {name.slice(0, 1).toUpperCase()}
    </span>
  );
}
