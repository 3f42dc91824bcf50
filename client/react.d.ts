// Type declarations for sidecast/react.
import type { EventMeta, Json, Member, Sidecast, Status } from "./sidecast.js";

export interface ChannelEvent<T = Json> extends EventMeta {
  data: T;
}

export interface ChannelState<T = Json> {
  status: Status;
  /** The newest event, or null before the first. */
  lastEvent: ChannelEvent<T> | null;
  /** The last `keep` events, oldest first. */
  events: ChannelEvent<T>[];
  /** Events were lost since subscribing: reload the state this channel describes. */
  gap: boolean;
}

/** Subscribes while mounted; a falsy channel subscribes to nothing. */
export declare function useChannel<T = Json>(
  client: Sidecast,
  channel: string | null | undefined,
  /** `rewind`: start from the channel's latest events (see `SubscribeOptions.rewind`). */
  options?: { keep?: number; rewind?: number },
): ChannelState<T>;

/** Who is on presence channel `channel` while mounted, kept current; a falsy channel: none. */
export declare function usePresence(client: Sidecast, channel: string | null | undefined): Member[];
