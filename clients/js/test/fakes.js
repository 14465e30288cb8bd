// Test doubles for client tests: a clock whose timers run only when a test advances it,
// and a WebSocket whose "server" side the test plays. Not a test file itself.

import { decodeFrame, encodeFrame, encodeBody, Codec, Kind } from '../codec.js';

export class FakeClock {
  constructor(start = 1_000_000) {
    this.t = start;
    this.seq = 0;
    /** @type {Map<number, { at: number, fn: () => void }>} */
    this.timers = new Map();
  }

  now() {
    return this.t;
  }

  setTimeout(fn, ms) {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** Moves time forward by `ms`, running every timer that falls due, in order. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (next === null || timer.at < next[1].at || (timer.at === next[1].at && id < next[0]))) {
          next = [id, timer];
        }
      }
      if (next === null) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
  }

  /** Delays of the pending timers, relative to now, sorted. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.t).sort((a, b) => a - b);
  }
}

export class FakeWebSocket {
  /** @type {FakeWebSocket[]} */
  static instances = [];

  static reset() {
    FakeWebSocket.instances = [];
  }

  static last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.closed = null;
    this.binaryType = 'blob';
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  send(bytes) {
    if (this.closed) throw new Error('send on a closed socket');
    this.sent.push(decodeFrame(bytes));
  }

  close(code = 1000, reason = '') {
    this.closed ??= { code, reason };
  }

  /** Frames of `kind` the client sent. */
  sentOf(kind) {
    return this.sent.filter((f) => f.kind === kind);
  }

  // ---- the server's side ----

  open() {
    this.onopen?.({});
  }

  deliver(frame) {
    const bytes = encodeFrame(frame);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }

  welcome(overrides = {}) {
    const body = {
      socket_id: 137465797017604096n,
      user_id: 'alice',
      gateway: 'gw-1',
      heartbeat: { base_ms: 10000, step_ms: 5000, max_ms: 60000, grow_after: 3, grace_ms: 5000 },
      max_body_bytes: 65536,
      server_time_ms: 1800000000000,
      ...overrides,
    };
    this.deliver({ kind: Kind.WELCOME, codec: Codec.MSGPACK, body: encodeBody(body, Codec.MSGPACK) });
  }

  heartbeatAck(next) {
    this.deliver({ kind: Kind.HEARTBEAT_ACK, codec: Codec.MSGPACK, body: encodeBody({ next_interval_ms: next }, Codec.MSGPACK) });
  }

  ack(id) {
    this.deliver({ kind: Kind.ACK, msgId: id });
  }

  error(id, code, message) {
    this.deliver({ kind: Kind.ERROR, msgId: id, codec: Codec.JSON, body: encodeBody({ code, message }, Codec.JSON) });
  }

  reconnect(delayMs, reason = 'drain') {
    this.deliver({ kind: Kind.RECONNECT, codec: Codec.MSGPACK, body: encodeBody({ delay_ms: delayMs, reason }, Codec.MSGPACK) });
  }

  serverClose(code, reason = '') {
    this.closed ??= { code, reason, byServer: true };
    this.onclose?.({ code, reason });
  }
}

/** Lets promise callbacks and async steps run. */
export function tick() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Parses a hex dump ("01 05 ...", line breaks allowed) into bytes. */
export function hex(s) {
  return Uint8Array.from(s.trim().split(/\s+/), (b) => parseInt(b, 16));
}

/** Bytes as a hex dump, for assertion messages. */
export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join(' ');
}

/** Waits (real time, at most `ms`) until `cond()` holds; for steps that inflate or deflate. */
export async function until(cond, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await tick();
  }
}
