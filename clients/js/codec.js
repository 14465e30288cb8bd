// The frame codec of docs/protocol.md (sections 2-5, 8), the body codecs (6.1), the typed
// bodies the gateway writes (6.2-6.5), close-code classification (9.1, 13.1) and end-to-end
// DEFLATE (3). Pure functions only; the connection logic lives in client.js.

import * as msgpack from './msgpack.js';

/** Protocol version (byte 0). */
export const VERSION = 1;
/** Fixed header length. */
export const HEADER_LEN = 12;
/** Trace context length. */
export const TRACE_LEN = 25;
/** Bytes of a position block before its room id (section 2.4). */
export const POSITION_LEN = 18;
/** Longest route the wire can carry (the length is one byte). */
export const MAX_ROUTE_LEN = 255;
/** Longest room id (and the gateway's default route limit). */
export const MAX_ID_LEN = 128;

/** Frame kinds (section 4). */
export const Kind = Object.freeze({
  HELLO: 1,
  WELCOME: 2,
  HEARTBEAT: 3,
  HEARTBEAT_ACK: 4,
  PUBLISH: 5,
  PUSH: 6,
  ACK: 7,
  JOIN: 8,
  LEAVE: 9,
  ERROR: 10,
  RECONNECT: 11,
  REFRESH: 12,
});

/** Body codecs (flags bits 0-1, section 3). */
export const Codec = Object.freeze({ RAW: 0, MSGPACK: 1, JSON: 2 });

/** Flag bits (section 3). */
export const Flag = Object.freeze({
  CODEC: 0x03,
  COMPRESSED: 0x04,
  TRACE: 0x08,
  RECEIPT: 0x10,
  // A position block (history stream, epoch, offset) follows the trace context (2.4).
  POSITION: 0x20,
  RESERVED: 0xc0,
});

const CODEC_NAMES = ['raw', 'msgpack', 'json'];

/**
 * Codec name (`raw`, `msgpack`, `json`) to its number.
 * @param {string} name
 * @returns {number}
 */
export function codecFromName(name) {
  const n = CODEC_NAMES.indexOf(name);
  if (n < 0) throw new TypeError(`unknown codec ${JSON.stringify(name)}`);
  return n;
}

/**
 * Codec number to its name.
 * @param {number} codec
 * @returns {string}
 */
export function codecName(codec) {
  return CODEC_NAMES[codec] ?? 'invalid';
}

/**
 * Why bytes are not a valid frame, or a frame cannot be encoded. `name` is the variant of
 * the Rust decoder's error (section 8): `Truncated`, `UnsupportedVersion`, `UnknownKind`,
 * `ReservedFlags`, `UnknownCodec`, `RouteTooLong`, `InvalidTraceContext`, `BodyTooLarge`,
 * `InvalidRoute`; `details` carries its fields.
 */
export class FrameError extends Error {
  /**
   * @param {string} kind
   * @param {Record<string, unknown>} [details]
   */
  constructor(kind, details = {}) {
    super(`${kind}${Object.keys(details).length ? ` ${JSON.stringify(details)}` : ''}`);
    this.name = 'FrameError';
    this.kind = kind;
    this.details = details;
  }
}

/** @param {number} b */
function isTokenByte(b) {
  return (
    (b >= 0x41 && b <= 0x5a) || // A-Z
    (b >= 0x61 && b <= 0x7a) || // a-z
    (b >= 0x30 && b <= 0x39) || // 0-9
    b === 0x5f || // _
    b === 0x2d || // -
    b === 0x3a || // :
    b === 0x40 || // @
    b === 0x3d || // =
    b === 0x2b //   +
  );
}

/**
 * Checks route bytes (section 5.2). Returns null when valid, else the `InvalidRoute`
 * reason: `{ BadByte: { byte, at } }`, `'EmptyToken'` or `'TooLong'`.
 * @param {Uint8Array} bytes
 * @returns {null | string | { BadByte: { byte: number, at: number } }}
 */
export function routeProblem(bytes) {
  if (bytes.length > MAX_ROUTE_LEN) return 'TooLong';
  // The decoder reports the first fault found scanning left to right.
  let tokenLen = 0;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0x2e) {
      if (tokenLen === 0) return 'EmptyToken';
      tokenLen = 0;
    } else if (isTokenByte(b)) {
      tokenLen++;
    } else {
      return { BadByte: { byte: b, at: i } };
    }
  }
  if (bytes.length > 0 && tokenLen === 0) return 'EmptyToken';
  return null;
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

/**
 * Whether `route` is a valid route (section 5.2); the empty route is valid.
 * @param {string} route
 */
export function isValidRoute(route) {
  return routeProblem(textEncoder.encode(route)) === null;
}

/**
 * Whether `room` is a valid room id (section 5.3): a non-empty route of at most 128 bytes.
 * @param {string} room
 */
export function isValidRoomId(room) {
  const bytes = textEncoder.encode(room);
  return bytes.length > 0 && bytes.length <= MAX_ID_LEN && routeProblem(bytes) === null;
}

/**
 * @typedef {object} TraceContext
 * @property {Uint8Array} traceId 16 bytes, not all zero
 * @property {Uint8Array} spanId 8 bytes, not all zero
 * @property {number} flags trace flags; bit 0 is "sampled"
 */

/**
 * @typedef {object} Frame
 * @property {number} kind a {@link Kind}
 * @property {number} codec a {@link Codec}
 * @property {boolean} compressed the body is raw DEFLATE (section 3)
 * @property {boolean} receipt on a push: the sender wants a receipt
 * @property {bigint} msgId u64 message id
 * @property {TraceContext | null} trace
 * @property {Position | null} position on a push from a history stream, to a connection
 *   that asked for positions (sections 2.4, 7.8)
 * @property {string} route
 * @property {Uint8Array} body
 */

/**
 * Where a push sits in its history stream.
 * @typedef {object} Position
 * @property {string | null} room the room's id, or null for the connection's user stream
 * @property {number} epoch the stream's epoch (below 2^53)
 * @property {number} offset the push's offset in the stream, from 1 without gaps
 */

/** @param {Uint8Array} bytes */
function allZero(bytes) {
  return bytes.every((b) => b === 0);
}

/**
 * Encodes a frame as the bytes of one binary WebSocket message (section 2). Validates it
 * first, since the gateway closes the session on any frame that does not decode.
 * @param {Partial<Frame> & { kind: number, msgId?: bigint | number }} frame
 * @returns {Uint8Array}
 */
export function encodeFrame(frame) {
  const { kind, codec = Codec.RAW, compressed = false, receipt = false, trace = null } = frame;
  const msgId = BigInt(frame.msgId ?? 0);
  const route = textEncoder.encode(frame.route ?? '');
  const body = frame.body ?? new Uint8Array(0);
  if (!Number.isInteger(kind) || kind < 1 || kind > 12) throw new FrameError('UnknownKind', { kind });
  if (!Number.isInteger(codec) || codec < 0 || codec > 2) throw new FrameError('UnknownCodec', { codec });
  if (msgId < 0n || msgId > 0xffffffffffffffffn) throw new RangeError(`message id ${msgId} is not a u64`);
  const problem = routeProblem(route);
  if (problem !== null) throw new FrameError('InvalidRoute', { reason: problem });
  if (trace && (trace.traceId.length !== 16 || trace.spanId.length !== 8 || allZero(trace.traceId) || allZero(trace.spanId))) {
    throw new FrameError('InvalidTraceContext');
  }
  const head = HEADER_LEN + (trace ? TRACE_LEN : 0);
  const out = new Uint8Array(head + route.length + body.length);
  const view = new DataView(out.buffer);
  out[0] = VERSION;
  out[1] = kind;
  out[2] = codec | (compressed ? Flag.COMPRESSED : 0) | (trace ? Flag.TRACE : 0) | (receipt ? Flag.RECEIPT : 0);
  out[3] = route.length;
  view.setBigUint64(4, msgId);
  if (trace) {
    out.set(trace.traceId, 12);
    out.set(trace.spanId, 28);
    out[36] = trace.flags & 0xff;
  }
  out.set(route, head);
  out.set(body, head + route.length);
  return out;
}

/**
 * Decodes one frame, applying the checks of section 8 in its order. `maxRoute` and
 * `maxBody` are the limits to enforce (a client trusts the gateway, so by default only the
 * wire's own limits apply).
 * @param {Uint8Array | ArrayBuffer} input
 * @param {{ maxRoute?: number, maxBody?: number }} [limits]
 * @returns {Frame}
 */
export function decodeFrame(input, limits = {}) {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  const maxRoute = Math.min(limits.maxRoute ?? MAX_ROUTE_LEN, MAX_ROUTE_LEN);
  const maxBody = limits.maxBody ?? Infinity;
  if (bytes.length < HEADER_LEN) throw new FrameError('Truncated', { needed: HEADER_LEN, got: bytes.length });
  if (bytes[0] !== VERSION) throw new FrameError('UnsupportedVersion', { version: bytes[0] });
  const kind = bytes[1];
  if (kind < 1 || kind > 12) throw new FrameError('UnknownKind', { kind });
  const flags = bytes[2];
  if (flags & Flag.RESERVED) throw new FrameError('ReservedFlags', { bits: flags & Flag.RESERVED });
  const codec = flags & Flag.CODEC;
  if (codec === 3) throw new FrameError('UnknownCodec', { codec });
  const routeLen = bytes[3];
  if (routeLen > maxRoute) throw new FrameError('RouteTooLong', { len: routeLen, max: maxRoute });
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const msgId = view.getBigUint64(4);
  let head = HEADER_LEN;
  /** @type {TraceContext | null} */
  let trace = null;
  if (flags & Flag.TRACE) {
    head += TRACE_LEN;
    if (bytes.length < head) throw new FrameError('Truncated', { needed: head, got: bytes.length });
    trace = { traceId: bytes.slice(12, 28), spanId: bytes.slice(28, 36), flags: bytes[36] };
    if (allZero(trace.traceId) || allZero(trace.spanId)) throw new FrameError('InvalidTraceContext');
  }
  /** @type {Position | null} */
  let position = null;
  if (flags & Flag.POSITION) {
    const at = head;
    head += POSITION_LEN;
    if (bytes.length < head) throw new FrameError('Truncated', { needed: head, got: bytes.length });
    const epoch = view.getBigUint64(at);
    const offset = view.getBigUint64(at + 8);
    const streamKind = bytes[at + 16];
    const idLen = bytes[at + 17];
    head += idLen;
    if (bytes.length < head) throw new FrameError('Truncated', { needed: head, got: bytes.length });
    const id = bytes.subarray(at + POSITION_LEN, head);
    const safe = BigInt(Number.MAX_SAFE_INTEGER);
    const valid =
      epoch !== 0n && offset !== 0n && epoch <= safe && offset <= safe &&
      ((streamKind === 1 && idLen === 0) || (streamKind === 2 && idLen > 0 && routeProblem(id) === null));
    if (!valid) throw new FrameError('InvalidPosition');
    position = { room: streamKind === 2 ? textDecoder.decode(id) : null, epoch: Number(epoch), offset: Number(offset) };
  }
  const bodyAt = head + routeLen;
  if (bytes.length < bodyAt) throw new FrameError('Truncated', { needed: bodyAt, got: bytes.length });
  if (bytes.length - bodyAt > maxBody) {
    throw new FrameError('BodyTooLarge', { len: bytes.length - bodyAt, max: maxBody });
  }
  const routeBytes = bytes.subarray(head, bodyAt);
  const problem = routeProblem(routeBytes);
  if (problem !== null) throw new FrameError('InvalidRoute', { reason: problem });
  return {
    kind,
    codec,
    compressed: (flags & Flag.COMPRESSED) !== 0,
    receipt: (flags & Flag.RECEIPT) !== 0,
    msgId,
    trace,
    position,
    // Route bytes are ASCII (checked above), so decoding cannot fail.
    route: textDecoder.decode(routeBytes),
    body: bytes.slice(bodyAt),
  };
}

/**
 * Parses a W3C `traceparent` (section 10.2) into a trace context, or null when malformed.
 * @param {string} header
 * @returns {TraceContext | null}
 */
export function parseTraceparent(header) {
  const parts = header.trim().split('-');
  if (parts.length < 4 || !/^[0-9a-f]{2}$/.test(parts[0]) || parts[0] === 'ff') return null;
  if (parts[0] === '00' && parts.length !== 4) return null;
  const [, t, s, f] = parts;
  if (!/^[0-9a-f]{32}$/.test(t) || !/^[0-9a-f]{16}$/.test(s) || !/^[0-9a-f]{2}$/.test(f)) return null;
  const hex = (/** @type {string} */ h) => Uint8Array.from(h.match(/../g) ?? [], (x) => parseInt(x, 16));
  const ctx = { traceId: hex(t), spanId: hex(s), flags: parseInt(f, 16) };
  return allZero(ctx.traceId) || allZero(ctx.spanId) ? null : ctx;
}

/**
 * Formats a trace context as a `traceparent` header value.
 * @param {TraceContext} ctx
 */
export function formatTraceparent(ctx) {
  const hex = (/** @type {Uint8Array} */ b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `00-${hex(ctx.traceId)}-${hex(ctx.spanId)}-${ctx.flags.toString(16).padStart(2, '0')}`;
}

/**
 * Encodes an application or typed body in `codec`. A raw body must already be bytes (or a
 * string, sent as UTF-8).
 * @param {unknown} value
 * @param {number} codec
 * @returns {Uint8Array}
 */
export function encodeBody(value, codec) {
  switch (codec) {
    case Codec.MSGPACK:
      return msgpack.encode(value);
    case Codec.JSON:
      return textEncoder.encode(
        JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v)) ?? 'null',
      );
    case Codec.RAW:
      if (value instanceof Uint8Array) return value;
      if (value instanceof ArrayBuffer) return new Uint8Array(value);
      if (typeof value === 'string') return textEncoder.encode(value);
      throw new TypeError('a raw body must be a Uint8Array, an ArrayBuffer or a string');
    default:
      throw new FrameError('UnknownCodec', { codec });
  }
}

/**
 * Decodes a body by its frame's codec bits (section 1.2: never by the connection's
 * preference). Raw bodies stay bytes; an empty msgpack/json body decodes to undefined.
 * @param {Uint8Array} bytes
 * @param {number} codec
 * @returns {unknown}
 */
export function decodeBody(bytes, codec) {
  if (codec === Codec.RAW) return bytes;
  if (bytes.length === 0) return undefined;
  if (codec === Codec.MSGPACK) return msgpack.decode(bytes);
  if (codec === Codec.JSON) return JSON.parse(textDecoder.decode(bytes));
  throw new FrameError('UnknownCodec', { codec });
}

/** @param {unknown} v @param {string} field */
function u32(v, field) {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 0xffffffff) return v;
  throw new TypeError(`${field}: expected an unsigned integer, got ${String(v)}`);
}

/**
 * A socket id as a decimal string: readers accept a number, a BigInt or a string of
 * decimal digits in either codec (section 6.1).
 * @param {unknown} v
 * @returns {string}
 */
export function socketIdString(v) {
  if (typeof v === 'bigint' && v >= 0n) return v.toString();
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return String(v);
  if (typeof v === 'string' && /^[0-9]{1,20}$/.test(v) && BigInt(v) <= 0xffffffffffffffffn) {
    return BigInt(v).toString();
  }
  throw new TypeError(`socket_id: not a u64: ${String(v)}`);
}

/** @param {unknown} body @returns {Record<string, unknown>} */
function asMap(body) {
  if (body && typeof body === 'object' && !Array.isArray(body) && !(body instanceof Uint8Array)) {
    return /** @type {Record<string, unknown>} */ (body);
  }
  throw new TypeError('expected a map body');
}

/**
 * @typedef {object} Welcome
 * @property {string} socketId decimal u64
 * @property {string} userId
 * @property {string} gateway
 * @property {{ baseMs: number, stepMs: number, maxMs: number, growAfter: number, graceMs: number }} heartbeat
 * @property {number} maxBodyBytes
 * @property {number} serverTimeMs
 */

/**
 * Reads a welcome body (section 6.2); unknown keys are ignored.
 * @param {unknown} body decoded body
 * @returns {Welcome}
 */
export function readWelcome(body) {
  const m = asMap(body);
  const hb = asMap(m.heartbeat);
  return {
    socketId: socketIdString(m.socket_id),
    userId: String(m.user_id),
    gateway: String(m.gateway),
    heartbeat: {
      baseMs: u32(hb.base_ms, 'heartbeat.base_ms'),
      stepMs: u32(hb.step_ms, 'heartbeat.step_ms'),
      maxMs: u32(hb.max_ms, 'heartbeat.max_ms'),
      growAfter: u32(hb.grow_after, 'heartbeat.grow_after'),
      graceMs: u32(hb.grace_ms, 'heartbeat.grace_ms'),
    },
    maxBodyBytes: u32(m.max_body_bytes, 'max_body_bytes'),
    serverTimeMs: Number(m.server_time_ms),
    recovery: m.recovery == null ? null : readRecovery(m.recovery),
  };
}

/**
 * Reads a recovery answer (6.7): in the welcome (user stream) or a join's ack (a room).
 * @param {unknown} body
 * @returns {{ recovered: boolean, epoch: number, offset: number }}
 */
export function readRecovery(body) {
  const m = asMap(body);
  return { recovered: m.recovered === true, epoch: Number(m.epoch ?? 0), offset: Number(m.offset ?? 0) };
}

/**
 * Reads a heartbeat ack body (6.3): the interval to use until the next ack.
 * @param {unknown} body
 * @returns {number}
 */
export function readHeartbeatAck(body) {
  return u32(asMap(body).next_interval_ms, 'next_interval_ms');
}

/**
 * Reads an error body (6.4).
 * @param {unknown} body
 * @returns {{ code: number, message: string }}
 */
export function readError(body) {
  const m = asMap(body);
  return { code: u32(m.code, 'code'), message: String(m.message ?? '') };
}

/**
 * Reads a reconnect body (6.5).
 * @param {unknown} body
 * @returns {{ delayMs: number, reason: string }}
 */
export function readReconnect(body) {
  const m = asMap(body);
  return { delayMs: u32(m.delay_ms, 'delay_ms'), reason: String(m.reason ?? '') };
}

/** Close code names (section 9.1). */
export const CLOSE_NAMES = Object.freeze({
  4000: 'shutdown',
  4001: 'heartbeat_timeout',
  4002: 'slow_consumer',
  4003: 'not_ready',
  4004: 'rate_limited',
  4005: 'internal_error',
  4500: 'protocol_error',
  4501: 'frame_too_large',
  4502: 'unauthorized',
  4503: 'kicked',
  4504: 'unsupported_version',
  4505: 'revoked',
});

/**
 * What a client does after a close with `code` (sections 9.1 and 13.1):
 * - `reconnect`: reconnect with backoff (4000-4499, and 1000-3999: WebSocket or transport);
 * - `new_token`: 4502, reconnect only with a new token;
 * - `stop`: do not reconnect until something changes (every other 4500-4999 code, and
 *   codes outside 1000-4999, which no conforming peer sends).
 * @param {number} code
 * @returns {'reconnect' | 'new_token' | 'stop'}
 */
export function closeAction(code) {
  if (code >= 1000 && code <= 4499) return 'reconnect';
  if (code === 4502) return 'new_token';
  return 'stop';
}

/**
 * Error code names (section 9.2).
 */
export const ERROR_NAMES = Object.freeze({
  400: 'bad_frame',
  401: 'bad_route',
  403: 'forbidden',
  404: 'unknown_route',
  405: 'unexpected_frame',
  413: 'too_large',
  426: 'unsupported_version',
  429: 'rate_limited',
  500: 'internal',
  503: 'unavailable',
  504: 'timeout',
});

/** @param {ReadableStream<Uint8Array>} stream @param {number} limit */
async function collect(stream, limit) {
  const reader = stream.getReader();
  /** @type {Uint8Array[]} */
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > limit) {
      await reader.cancel();
      throw new RangeError(`inflated body exceeds ${limit} bytes`);
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** @param {Uint8Array} bytes @param {TransformStream<Uint8Array, Uint8Array>} transform */
function pipe(bytes, transform) {
  const writer = transform.writable.getWriter();
  // Errors surface on the readable side; the write promise's rejection is the same error.
  writer.write(bytes).catch(() => {});
  writer.close().catch(() => {});
  return transform.readable;
}

/**
 * A DEFLATE transform stream, or null where the runtime has no `deflate-raw` format
 * (Node before 20.12/21.2 has the streams but not that format).
 * @param {'CompressionStream' | 'DecompressionStream'} which
 * @returns {TransformStream<Uint8Array, Uint8Array> | null}
 */
function deflateStream(which) {
  try {
    return new globalThis[which]('deflate-raw');
  } catch {
    return null;
  }
}

/** node:zlib, for Node versions without a `deflate-raw` stream; never reached in browsers. */
async function nodeZlib() {
  // A variable specifier keeps bundlers from trying to resolve a Node module for browsers.
  const name = 'node:zlib';
  return import(name);
}

/**
 * Inflates a raw DEFLATE body (RFC 1951, section 3), refusing to produce more than
 * `limit` bytes.
 * @param {Uint8Array} bytes
 * @param {number} [limit]
 * @returns {Promise<Uint8Array>}
 */
export async function inflateRaw(bytes, limit = 16 * 1024 * 1024) {
  const stream = deflateStream('DecompressionStream');
  if (stream) return collect(pipe(bytes, stream), limit);
  const zlib = await nodeZlib();
  try {
    return new Uint8Array(zlib.inflateRawSync(bytes, { maxOutputLength: limit }));
  } catch (e) {
    if (e && e.code === 'ERR_BUFFER_TOO_LARGE') throw new RangeError(`inflated body exceeds ${limit} bytes`);
    throw e;
  }
}

/**
 * Compresses a body with raw DEFLATE.
 * @param {Uint8Array} bytes
 * @returns {Promise<Uint8Array>}
 */
export async function deflateRaw(bytes) {
  const stream = deflateStream('CompressionStream');
  if (stream) return collect(pipe(bytes, stream), Infinity);
  const zlib = await nodeZlib();
  return new Uint8Array(zlib.deflateRawSync(bytes));
}
