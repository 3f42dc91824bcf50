// A React page built with esbuild from React on npm and sidecast's client and hook.
import { useState } from "react";
import { createRoot } from "react-dom/client";
import { Sidecast } from "../../../client/sidecast.js";
import { useChannel, usePresence } from "../../../client/react.js";

function Progress({ client, channel, rewind }) {
  const { status, lastEvent, events } = useChannel(client, channel, { rewind });
  return (
    <div>
      <p>Status: <span id="status">{status}</span></p>
      <p>Last: <span id="last">{lastEvent ? `${lastEvent.channel} #${lastEvent.seq} ${JSON.stringify(lastEvent.data)}` : "none"}</span></p>
      <p>Count: <span id="count">{events.length}</span></p>
    </div>
  );
}

function WhoIsHere({ client, channel }) {
  const members = usePresence(client, channel);
  return <ul id="here">{members.map((m) => <li key={m.id}>{m.user ?? m.id}</li>)}</ul>;
}

function App({ client, rewind, presence }) {
  const [channel, setChannel] = useState("project:42");
  const [mounted, setMounted] = useState(true);
  return (
    <main>
      <button id="switch" onClick={() => setChannel("order:7")}>Watch order:7</button>
      <button id="unmount" onClick={() => setMounted(false)}>Unmount</button>
      {mounted && <Progress client={client} channel={channel} rewind={rewind} />}
      {mounted && presence && <WhoIsHere client={client} channel={presence} />}
    </main>
  );
}

const params = new URLSearchParams(location.search);
const client = new Sidecast(params.get("ws"));
const rewind = Number(params.get("rewind") ?? 0);
const presence = params.get("presence");
createRoot(document.getElementById("root")).render(<App client={client} rewind={rewind} presence={presence} />);
