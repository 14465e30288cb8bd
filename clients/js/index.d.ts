// Type declarations for rt-js (hand-written; the JavaScript carries JSDoc too).

export const CLIENT_NAME: string;

export const Kind: Readonly<{
  HELLO: 1; WELCOME: 2; HEARTBEAT: 3; HEARTBEAT_ACK: 4; PUBLISH: 5; PUSH: 6;
  ACK: 7; JOIN: 8; LEAVE: 9; ERROR: 10; RECONNECT: 11; REFRESH: 12;
}>;
export const Codec: Readonly<{ RAW: 0; MSGPACK: 1; JSON: 2 }>;
export const Flag: Readonly<{ CODEC: 0x03; COMPRESSED: 0x04; TRACE: 0x08; RECEIPT: 0x10; RESERVED: 0xe0 }>;
export const CLOSE_NAMES: Readonly<Record<number, string>>;
export const ERROR_NAMES: Readonly<Record<number, string>>;

export type CodecName = 'raw' | 'msgpack' | 'json';

export interface TraceContext {
  /** 16 bytes, not all zero. */
  traceId: Uint8Array;
  /** 8 bytes, not all zero. */
  spanId: Uint8Array;
  flags: number;
}

export interface Frame {
  kind: number;
  codec: number;
  compressed: boolean;
  receipt: boolean;
  msgId: bigint;
  trace: TraceContext | null;
  /** On a push from a history stream to a connection that asked for positions (2.4). */
  position: Position | null;
  route: string;
  body: Uint8Array;
}

/** Where a push sits in its history stream (protocol 2.4, 7.8). */
export interface Position {
  /** The room, or null for the connection's user stream. */
  room: string | null;
  /** The stream's epoch (below 2^53). */
  epoch: number;
  /** From 1, without gaps within an epoch. */
  offset: number;
}

/** The answer to a recovery (protocol 6.7). */
export interface Recovery {
  /** true: every missed push of the stream follows; false: reload that stream's state. */
  recovered: boolean;
  epoch: number;
  offset: number;
}

/** A `recovered` event: the answer for one stream after a reconnect. */
export interface Recovered extends Recovery {
  /** The room, or null for the user stream. */
  room: string | null;
}

export interface FrameInput extends Partial<Omit<Frame, 'msgId' | 'position'>> {
  kind: number;
  msgId?: bigint | number;
}

/** `kind` is the Rust decoder's variant name (protocol section 8). */
export class FrameError extends Error {
  kind: string;
  details: Record<string, unknown>;
}

export function encodeFrame(frame: FrameInput): Uint8Array;
export function decodeFrame(bytes: Uint8Array | ArrayBuffer, limits?: { maxRoute?: number; maxBody?: number }): Frame;
export function isValidRoute(route: string): boolean;
export function isValidRoomId(room: string): boolean;
export function codecFromName(name: CodecName): number;
export function codecName(codec: number): string;
export function encodeBody(value: unknown, codec: number): Uint8Array;
export function decodeBody(bytes: Uint8Array, codec: number): unknown;
export function parseTraceparent(header: string): TraceContext | null;
export function formatTraceparent(ctx: TraceContext): string;
export function socketIdString(v: unknown): string;
export function inflateRaw(bytes: Uint8Array, limit?: number): Promise<Uint8Array>;
export function deflateRaw(bytes: Uint8Array): Promise<Uint8Array>;
export function closeAction(code: number): 'reconnect' | 'new_token' | 'stop';

export interface HeartbeatParams {
  baseMs: number;
  stepMs: number;
  maxMs: number;
  growAfter: number;
  graceMs: number;
}

export interface Welcome {
  /** Decimal u64 (never a float, protocol 11.1). */
  socketId: string;
  userId: string;
  gateway: string;
  heartbeat: HeartbeatParams;
  maxBodyBytes: number;
  serverTimeMs: number;
  /** Present when the connection named its user stream's position (`since`). */
  recovery: Recovery | null;
}

export function readWelcome(body: unknown): Welcome;
export function readRecovery(body: unknown): Recovery;
export function readHeartbeatAck(body: unknown): number;
export function readError(body: unknown): { code: number; message: string };
export function readReconnect(body: unknown): { delayMs: number; reason: string };

export namespace msgpack {
  class MsgpackError extends Error {}
  function encode(value: unknown): Uint8Array;
  function decode(bytes: Uint8Array): unknown;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface BackoffOptions {
  /** Default 100. */
  baseMs?: number;
  /** Default 30000. */
  capMs?: number;
  /** Default 0.3 (protocol 13.1); `'full'` for uniform(0, ceiling). */
  jitter?: number | 'full';
}

export function backoffDelay(n: number, opts?: BackoffOptions, random?: () => number): number;

export interface ClientOptions {
  url: string;
  token: string | (() => string | Promise<string>);
  codec?: 'msgpack' | 'json';
  autoReceipt?: boolean;
  rejoin?: boolean;
  reconnect?: boolean;
  backoff?: BackoffOptions;
  requestTimeoutMs?: number;
  /** Longest publish route sent (the gateway's route limit); default 128. */
  maxRouteBytes?: number;
  maxInflateBytes?: number;
  /** Keep positions and recover missed pushes after a reconnect (protocol 7.8); default false. */
  recovery?: boolean;
  clientName?: string;
  WebSocket?: { new (url: string): WebSocket };
  /**
   * Transports in order of preference (protocol section 1.4); default `['websocket']`.
   * With `['websocket', 'longpoll']` a WebSocket that does not open falls back to HTTP
   * long-polling, and the session moves to a WebSocket when one gets through.
   */
  transports?: Transport[];
  /** For long-polling; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** A WebSocket not open after this falls back to long-polling; default 10000. */
  wsTimeoutMs?: number;
  /** First upgrade attempt after falling back (doubling per failure, 60 s cap); default 2000. */
  upgradeDelayMs?: number;
  clock?: Clock;
  random?: () => number;
}

export type Transport = 'websocket' | 'longpoll';

/** A batch of the long-poll transport: each frame prefixed by its length (u32 BE). */
export function encodeBatch(frames: Uint8Array[]): Uint8Array;
/** The frames of a batch; throws on a truncated record. */
export function decodeBatch(batch: Uint8Array): Uint8Array[];
/** The long-poll endpoint (`http(s)`, path `/lp`) of a WebSocket endpoint. */
export function longPollUrl(wsUrl: string): URL;

/** A WebSocket-shaped connection over WebSocket or long-polling (used by `Client`). */
export class FallbackSocket {
  constructor(
    url: string,
    options: {
      transports: Transport[];
      WebSocket?: { new (url: string): WebSocket };
      fetch?: typeof fetch;
      clock: Clock;
      random: () => number;
      wsTimeoutMs?: number;
      upgradeDelayMs?: number;
    },
  );
  readonly transport: Transport | null;
  readonly sid: string;
  binaryType: string;
  onopen: ((ev?: unknown) => void) | null;
  onmessage: ((ev: { data: Uint8Array | ArrayBuffer }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev?: unknown) => void) | null;
  send(bytes: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export interface Push {
  route: string;
  id: bigint;
  codec: CodecName;
  body: unknown;
  bytes: Uint8Array;
  receipt: boolean;
  /** With `recovery: true`, for a push kept in history. */
  position: Position | null;
  ack(): void;
}

export interface PublishOptions {
  codec?: CodecName;
  compress?: boolean;
  traceparent?: string;
  /** `false`: message id 0, fire and forget. */
  ack?: boolean;
}

export class RtError extends Error {
  constructor(code: number, message: string, msgId?: bigint, name?: string);
  /** Error code (protocol 9.2); 0 for a local failure. */
  code: number;
  /** `forbidden`, `timeout`, ...; `disconnected`, `closed` or `timeout` for local failures. */
  codeName: string;
  detail: string;
  msgId: bigint;
}

export interface ClientEventMap {
  connecting: CustomEvent<{ attempt: number }>;
  connected: CustomEvent<Welcome>;
  disconnected: CustomEvent<{ code: number; reason: string; codeName?: string; delayMs: number }>;
  closed: CustomEvent<{ code: number; reason: string; codeName?: string }>;
  push: CustomEvent<Push>;
  reconnect: CustomEvent<{ delayMs: number; reason: string }>;
  /** After a reconnect with `recovery: true`: one per stream the client had a position in. */
  recovered: CustomEvent<Recovered>;
  error: CustomEvent<Error>;
}

export type ClientState = 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed';

export class Client extends EventTarget {
  constructor(options: ClientOptions);
  readonly state: ClientState;
  readonly welcome: Welcome | null;
  readonly rooms: Set<string>;
  /** What carries the connection now, or null while none does. */
  readonly transport: Transport | null;
  /** Last position per history stream: '' for the user stream, else the room id. */
  readonly positions: Map<string, { epoch: number; offset: number }>;
  connect(): Promise<Welcome>;
  publish(route: string, body: unknown, options?: PublishOptions): Promise<void>;
  /** With `recovery: true` resolves with the ack's recovery answer (undefined otherwise). */
  join(room: string): Promise<Recovered | undefined>;
  leave(room: string): Promise<void>;
  refresh(token: string): Promise<void>;
  close(code?: number, reason?: string): void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (ev: ClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}
