// Type-checked with `tsc --noEmit --strict` by types.test.mjs: client/node/publisher.d.mts
// describes the Node publisher as docs/publishing.md shows it, and rejects misuse.
import { PublishError, Publisher, type Reply } from "../../../client/node/publisher.mjs";

const sidecast = new Publisher({ socket: "/run/sidecast/sidecast.sock", timeoutMs: 5000 });
const overHttp = new Publisher({ url: "http://127.0.0.1:3002", key: "k" });

export async function report(projectId: string): Promise<number | undefined> {
  const reply: Reply = await sidecast.publish(`project:${projectId}`, { progress: 40 }, { idem: "job-1:40" });
  await sidecast.publishToUser("u1", { type: "task_update" });
  await sidecast.broadcast({ maintenance: true }, { fireAndForget: true });
  const closed = await overHttp.disconnectUser("u1");
  console.log(closed.disconnected, reply.duplicate, reply.seqs);
  try {
    await sidecast.send({ channels: ["a", "b"], data: 1 });
  } catch (error) {
    if (error instanceof PublishError && error.retryable) {
      const code: "disconnected" | "timeout" | "unreachable" | "unavailable" | "rejected" | "unauthorized" | "closed" = error.code;
      console.log(code, error.reply?.error, error.status);
    }
  }
  // @ts-expect-error: the options are an object
  await sidecast.publish("a", 1, "job-1");
  // @ts-expect-error: no such option
  new Publisher({ path: "/run/sidecast.sock" });
  await sidecast.close();
  return reply.seq;
}
