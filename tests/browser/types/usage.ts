// Type-checked with `tsc --noEmit --strict` by types.test.mjs: the declarations describe the API
// as docs/client.md shows it, and reject misuse.
import { Sidecast, type Status, type Transport } from "../../../client/sidecast.js";
import { useChannel, usePresence } from "../../../client/react.js";

const client = new Sidecast("ws://localhost:3001/ws", {
  getToken: async () => "jwt",
  initialDelayMs: 250,
});
const status: Status = client.status;
const transport: Transport = client.transport;
const behindAProxy = new Sidecast("wss://rt.example.com/ws", {
  fallback: true,
  fallbackAfter: 2,
  webSocketRetryMs: 30_000,
  sseUrl: "https://rt.example.com/sse",
  withCredentials: true,
});
behindAProxy.close();
const off = client.on("status", (s: Status) => console.log(s));
off();
client.on("gap", ({ channel }) => console.log(channel));
client.on("error", (error) => console.log(error.code, error.message, error.id, error.fatal));
client.on("user", ({ data, channel, seq }) => console.log(data, channel, seq));
const user: string | null = client.userId;

interface Progress {
  progress: number;
}
const sub = client.subscribe<Progress>(
  "project:42",
  (data, meta) => console.log(data.progress, meta.channel, meta.seq),
  { onGap: ({ channel }) => console.log(channel), onError: (e) => console.log(e.code) },
);
// Who is here, on a presence channel.
const room = client.subscribe("doc:1", () => {});
const here: string[] = room.presence().map((m) => m.user ?? m.id);
const stopJoins = room.on("join", (m) => console.log(m.id, m.clients.length, m.info));
room.on("presence", (members) => console.log(members.length, here));
stopJoins();
sub.unsubscribe();
// An async handler: the event is acknowledged once it resolves.
client.subscribe<Progress>("job:1", async (data) => {
  await Promise.resolve(data.progress);
});
// manualAck: the page confirms later.
client.subscribe("order:7", (_data, meta) => setTimeout(() => meta.ack?.(), 10), { manualAck: true });
client.close();

export function WhoIsHere({ doc }: { doc: number }) {
  const members = usePresence(client, `doc:${doc}`);
  return members.map((m) => m.user ?? m.id).join(", ");
}

export function RenderProgress({ id }: { id: number }) {
  const { status: s, lastEvent, events, gap } = useChannel<Progress>(client, `project:${id}`);
  const percent: number | undefined = lastEvent?.data.progress;
  return `${s} ${percent} ${events.length} ${gap}`;
}

// @ts-expect-error: the callback gets data and meta, not a message
client.subscribe("x", (data: string, meta: string) => meta);
// @ts-expect-error: manualAck is a boolean
client.subscribe("x", () => {}, { manualAck: "yes" });
// @ts-expect-error: no such event
client.on("message", () => {});
// @ts-expect-error: the fallback is a boolean
new Sidecast("ws://x/ws", { fallback: "sse" });
export { status, transport, user };
