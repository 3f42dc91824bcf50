// sidecast/react: the `useChannel` and `usePresence` hooks. React is the app's own dependency, imported here as
// "react" and resolved by the app's bundler. Guide: docs/client.md.

import { useEffect, useState } from "react";

/**
 * Subscribes `client` to `channel` while the component is mounted.
 * Returns { status, lastEvent, events, gap }: the connection status, the newest event
 * ({ data, channel, seq }) or null, the last `keep` events (oldest first), and whether
 * events were lost since subscribing (the component should reload its state). With
 * `rewind` (e.g. 1), it starts from the channel's latest events, so `lastEvent` holds the
 * current state on first paint after subscribing.
 * Changing `channel` unsubscribes from the old one and starts afresh.
 */
export function useChannel(client, channel, { keep = 100, rewind = 0 } = {}) {
  const [status, setStatus] = useState(client.status);
  const [feed, setFeed] = useState({ events: [], gap: false });

  useEffect(() => {
    setStatus(client.status);
    return client.on("status", setStatus);
  }, [client]);

  useEffect(() => {
    setFeed({ events: [], gap: false });
    if (!channel) return undefined;
    const sub = client.subscribe(
      channel,
      (data, meta) =>
        setFeed((feed) => ({ ...feed, events: [...feed.events, { data, ...meta }].slice(-keep) })),
      { rewind, onGap: () => setFeed((feed) => ({ ...feed, gap: true })) },
    );
    return () => sub.unsubscribe();
  }, [client, channel, keep, rewind]);

  const lastEvent = feed.events.length > 0 ? feed.events[feed.events.length - 1] : null;
  return { status, lastEvent, events: feed.events, gap: feed.gap };
}

/**
 * Who is on presence channel `channel` (one of the server's `presence_channels`) while the
 * component is mounted: the members ({ id, user, clients, info }), kept current as they join
 * and leave, and replaced by the server's list after a reconnect.
 */
export function usePresence(client, channel) {
  const [members, setMembers] = useState([]);

  useEffect(() => {
    setMembers([]);
    if (!channel) return undefined;
    const sub = client.subscribe(channel, () => {});
    const stop = sub.on("presence", (list) => setMembers(list));
    setMembers(sub.presence());
    return () => {
      stop();
      sub.unsubscribe();
    };
  }, [client, channel]);

  return members;
}
