// The connection: one WebSocket at a time, the session flow of docs/protocol.md section 7
// and the client guidance of section 13 (heartbeats that follow the gateway's acks,
// reconnects with backoff that honour reconnect frames and close codes, receipts).
//
// Time, randomness and the WebSocket constructor are injected (options.clock,
// options.random, options.WebSocket) so tests drive every timer by hand.

import {
  Codec,
  Kind,
  FrameError,
  closeAction,
  codecFromName,
  decodeBody,
  decodeFrame,
  deflateRaw,
  encodeBody,
  encodeFrame,
  inflateRaw,
  isValidRoomId,
  isValidRoute,
  MAX_ID_LEN,
  parseTraceparent,
  readError,
  readHeartbeatAck,
  readReconnect,
  readRecovery,
  readWelcome,
  CLOSE_NAMES,
  ERROR_NAMES,
} from './codec.js';
import { FallbackSocket } from './transport.js';

/** Library name and version, sent in the hello frame (section 6.6). */
export const CLIENT_NAME = 'rt-js/0.1.0';

/**
 * @typedef {object} Clock
 * @property {() => number} now milliseconds
 * @property {(fn: () => void, ms: number) => unknown} setTimeout
 * @property {(handle: unknown) => void} clearTimeout
 */

/** @type {Clock} */
const realClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(/** @type {any} */ (h)),
};

/**
 * An `error` frame from the gateway, or a request that failed on this side (`code` 0 with
 * `name` `disconnected`, `closed` or `timeout`: the outcome is unknown, section 13.1).
 */
export class RtError extends Error {
  /**
   * @param {number} code error code (section 9.2), 0 for a local failure
   * @param {string} message
   * @param {bigint} [msgId]
   * @param {string} [name] code name; derived from `code` when left out
   */
  constructor(code, message, msgId = 0n, name) {
    super(`${code ? `${code} ` : ''}${message}`);
    this.name = 'RtError';
    this.code = code;
    this.codeName =
      name ?? /** @type {Record<number, string>} */ (ERROR_NAMES)[code] ?? (code >= 500 ? 'server' : 'refused');
    this.detail = message;
    this.msgId = msgId;
  }
}

/**
 * The reconnect delay before attempt `n` (0-based): protocol section 13.1,
 * `min(cap, base * 2^n) * (1 + uniform(-jitter, +jitter))`. With `jitter: 'full'` the delay
 * is `uniform(0, min(cap, base * 2^n))` instead ("full jitter").
 * @param {number} n
 * @param {{ baseMs?: number, capMs?: number, jitter?: number | 'full' }} [opts]
 * @param {() => number} [random] uniform in [0, 1)
 */
export function backoffDelay(n, opts = {}, random = Math.random) {
  const { baseMs = 100, capMs = 30000, jitter = 0.3 } = opts;
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(n, 52));
  if (jitter === 'full') return Math.floor(random() * ceiling);
  return Math.max(0, Math.round(ceiling * (1 + (random() * 2 - 1) * jitter)));
}

/**
 * @param {string} type
 * @param {unknown} detail
 */
function makeEvent(type, detail) {
  if (typeof CustomEvent === 'function') return new CustomEvent(type, { detail });
  // Node 18 has EventTarget but no CustomEvent global.
  const e = new Event(type);
  Object.defineProperty(e, 'detail', { value: detail });
  return e;
}

/**
 * @typedef {object} ClientOptions
 * @property {string} url the gateway endpoint, `ws(s)://host[:port]/ws`
 * @property {string | (() => string | Promise<string>)} token a JWT, or a function called
 *   before every connection attempt (it may fetch a fresh one)
 * @property {'msgpack' | 'json'} [codec] body codec preference (section 1.2) and the
 *   default codec of published bodies; default `msgpack`
 * @property {boolean} [autoReceipt] ack pushes whose receipt flag is set, after the `push`
 *   listeners ran (section 7.5); default true
 * @property {boolean} [rejoin] re-send joins for the rooms this client joined after a
 *   reconnect (section 13.1); default true
 * @property {boolean} [reconnect] reconnect automatically; default true
 * @property {{ baseMs?: number, capMs?: number, jitter?: number | 'full' }} [backoff]
 *   defaults: 100 ms, 30 s, 0.3 (section 13.1)
 * @property {number} [requestTimeoutMs] a publish, join, leave or refresh not answered in
 *   this time is rejected with `timeout` (its outcome is unknown); default 15000
 * @property {number} [maxRouteBytes] longest publish route sent; the gateway's route
 *   limit (default 128, section 2.3)
 * @property {number} [maxInflateBytes] largest body a compressed push may inflate to;
 *   default 16 MiB
 * @property {boolean} [recovery] ask for positions and recover missed pushes after a
 *   reconnect (sections 7.8, 13.5): the client keeps the last offset of its user stream and
 *   of each joined room and sends them when it reconnects; default false
 * @property {string} [clientName] sent in the hello frame; default `rt-js/0.1.0`
 * @property {Array<'websocket' | 'longpoll'>} [transports] transports in order of
 *   preference (section 1.4); default `['websocket']`. With `['websocket', 'longpoll']` a
 *   WebSocket that does not open falls back to HTTP long-polling, and the session moves to
 *   a WebSocket as soon as one gets through; `['longpoll']` polls only
 * @property {typeof fetch} [fetch] for long-polling; default `globalThis.fetch`
 * @property {number} [wsTimeoutMs] a WebSocket not open after this falls back; default 10000
 * @property {number} [upgradeDelayMs] first upgrade attempt after falling back, doubling
 *   per failure up to 60 s; default 2000
 * @property {typeof WebSocket} [WebSocket] the constructor; default `globalThis.WebSocket`
 * @property {Clock} [clock]
 * @property {() => number} [random]
 */

/**
 * A push delivered to the application.
 * @typedef {object} Push
 * @property {string} route
 * @property {bigint} id push id (0n when the service gave none)
 * @property {'raw' | 'msgpack' | 'json'} codec
 * @property {unknown} body decoded by the frame's codec (raw: Uint8Array), inflated first
 *   when the frame was compressed
 * @property {Uint8Array} bytes the body bytes after inflation
 * @property {boolean} receipt the sender asked for a delivery receipt
 * @property {import('./codec.js').Position | null} position its place in its history
 *   stream (with `recovery: true`, for pushes kept in history)
 * @property {() => void} ack sends the receipt now (once; no-op for id 0)
 */

/**
 * The answer to a recovery (section 7.8): `recovered: true` means every push missed in
 * that stream was delivered (as `push` events before any later one), `false` that they
 * cannot be and the application should reload that stream's state.
 * @typedef {object} Recovered
 * @property {string | null} room the room, or null for the user stream
 * @property {boolean} recovered
 * @property {number} epoch
 * @property {number} offset
 */

/**
 * A client connection. Events (all `CustomEvent`s, payload in `detail`):
 * - `connecting` `{ attempt }`: a WebSocket is being opened;
 * - `connected` `Welcome`: the welcome arrived; requests may flow;
 * - `disconnected` `{ code, reason, delayMs }`: the connection is gone and another attempt
 *   follows in `delayMs`;
 * - `closed` `{ code, reason }`: no more attempts (terminal close code, `close()` called,
 *   or a protocol failure);
 * - `push` `Push`; `reconnect` `{ delayMs, reason }` (the gateway is draining);
 * - `recovered` `Recovered`: after a reconnect with `recovery: true`, once per stream the
 *   client had a position in (the user stream with the welcome, each room with its
 *   rejoin's ack);
 * - `error` `RtError | FrameError | Error`: an error frame not tied to a request, a frame
 *   that did not decode, a failed rejoin.
 */
export class Client extends EventTarget {
  /** @param {ClientOptions} options */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError('options.url is required');
    if (options.token === undefined) throw new TypeError('options.token is required');
    this.options = options;
    this.codec = codecFromName(options.codec ?? 'msgpack');
    /** @type {Clock} */
    this.clock = options.clock ?? realClock;
    this.random = options.random ?? Math.random;
    /** @type {'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed'} */
    this.state = 'idle';
    /** @type {import('./codec.js').Welcome | null} */
    this.welcome = null;
    /** Rooms joined (acked), re-joined after a reconnect. */
    this.rooms = new Set();
    /**
     * Last position per history stream ('' for the user stream, else the room id).
     * @type {Map<string, { epoch: number, offset: number }>}
     */
    this.positions = new Map();
    /** @type {WebSocket | null} */
    this.ws = null;
    this.attempt = 0;
    this.nextId = 1;
    /** @type {Map<bigint, { resolve: (v: any) => void, reject: (e: Error) => void, timer: unknown, onAck?: (ack?: any) => unknown }>} */
    this.pending = new Map();
    /** Requests made before the welcome, sent when it comes. @type {Array<() => void>} */
    this.waiting = [];
    // Pushes are handed to the application in arrival order, even when one must be
    // inflated asynchronously and the next one need not be.
    /** @type {Promise<void>} */
    this.pushChain = Promise.resolve();
    // Frames are sent in the order the application asked, even when one body is being
    // compressed asynchronously.
    /** @type {Promise<void>} */
    this.sendChain = Promise.resolve();
    this.timers = { beat: /** @type {unknown} */ (null), dead: /** @type {unknown} */ (null), retry: /** @type {unknown} */ (null) };
    this.interval = 0;
    this.lastBeatAt = 0;
    /** Set by a reconnect frame: when the next attempt may start (ms on the clock). */
    this.reconnectAt = /** @type {number | null} */ (null);
    // Numbers connection attempts: a token that arrives after a newer attempt started, or
    // after close(), is dropped.
    this.connSeq = 0;
  }

  /** What carries the connection now: `websocket`, `longpoll`, or null while none does. */
  get transport() {
    if (!this.ws) return null;
    return /** @type {any} */ (this.ws).transport ?? 'websocket';
  }

  /** Starts connecting (and reconnecting). Resolves with the first welcome. */
  connect() {
    if (this.state === 'closed') return Promise.reject(new RtError(0, 'client closed', 0n, 'closed'));
    const first = new Promise((resolve, reject) => {
      const onConnected = (/** @type {Event} */ e) => {
        this.removeEventListener('closed', onClosed);
        resolve(/** @type {CustomEvent} */ (e).detail);
      };
      const onClosed = (/** @type {Event} */ e) => {
        this.removeEventListener('connected', onConnected);
        const d = /** @type {CustomEvent} */ (e).detail;
        reject(new RtError(0, `closed: ${d.code} ${d.reason}`, 0n, 'closed'));
      };
      this.addEventListener('connected', onConnected, { once: true });
      this.addEventListener('closed', onClosed, { once: true });
    });
    if (this.state === 'idle') this.open();
    return first;
  }

  /**
   * Publishes `body` on `route` (section 7.3). Resolves when the gateway acks (it handed
   * the message to the bus); rejects with an `RtError` on an error frame.
   * @param {string} route non-empty route
   * @param {unknown} body encoded with `options.codec` (or the client's codec); a
   *   Uint8Array with codec `raw` is sent as is
   * @param {{ codec?: 'raw' | 'msgpack' | 'json', compress?: boolean, traceparent?: string, ack?: boolean }} [options]
   *   `ack: false` sends with message id 0 (fire and forget; resolves once sent)
   * @returns {Promise<void>}
   */
  publish(route, body, options = {}) {
    // A route the gateway cannot decode would end the whole session (section 8): refuse it
    // here instead (section 13.3).
    const routeBytes = new TextEncoder().encode(route).length;
    if (!route || !isValidRoute(route) || routeBytes > (this.options.maxRouteBytes ?? MAX_ID_LEN)) {
      return Promise.reject(new RtError(401, `invalid publish route ${JSON.stringify(route)}`, 0n));
    }
    const codec =
      options.codec !== undefined ? codecFromName(options.codec) : body instanceof Uint8Array ? Codec.RAW : this.codec;
    let bytes;
    try {
      bytes = encodeBody(body, codec);
    } catch (e) {
      return Promise.reject(e);
    }
    const trace = options.traceparent ? parseTraceparent(options.traceparent) : null;
    return this.request(Kind.PUBLISH, route, options.ack === false, async () => {
      const compressed = options.compress === true;
      const wire = compressed ? await deflateRaw(bytes) : bytes;
      const max = this.welcome?.maxBodyBytes ?? Infinity;
      if (wire.length > max) throw new RtError(413, `body of ${wire.length} bytes exceeds ${max}`);
      return { codec, compressed, trace, body: wire };
    });
  }

  /**
   * Joins a room (section 7.4). Resolves on the ack (the socket now receives the room's
   * pushes); rejects with the error frame's `RtError` (403 forbidden, 504 timeout, ...).
   * @param {string} room
   * @returns {Promise<void>}
   */
  join(room) {
    if (!isValidRoomId(room)) return Promise.reject(new RtError(401, `invalid room id ${JSON.stringify(room)}`));
    if (this.options.recovery !== true) {
      return this.request(Kind.JOIN, room, false, null, () => {
        this.rooms.add(room);
      });
    }
    // With recovery, every join names the client's position (epoch 0 when it has none:
    // the ack then tells the stream's current position, section 7.8).
    const known = this.positions.get(room);
    const since = known ?? { epoch: 0, offset: 0 };
    const prepare = async () => ({
      codec: this.codec,
      compressed: false,
      trace: null,
      body: encodeBody({ epoch: since.epoch, offset: since.offset }, this.codec),
    });
    return this.request(Kind.JOIN, room, false, prepare, (/** @type {import('./codec.js').Frame} */ ack) => {
      this.rooms.add(room);
      if (ack.body.length === 0) return undefined;
      const r = readRecovery(decodeBody(ack.body, ack.codec));
      this.afterRecovery(room, r, known !== undefined);
      return { room, ...r };
    });
  }

  /**
   * Leaves a room.
   * @param {string} room
   * @returns {Promise<void>}
   */
  leave(room) {
    if (!isValidRoomId(room)) return Promise.reject(new RtError(401, `invalid room id ${JSON.stringify(room)}`));
    // Forget it now: a leave's outcome should not be undone by a rejoin after a reconnect.
    this.rooms.delete(room);
    return this.request(Kind.LEAVE, room, false, null);
  }

  /**
   * Hands the gateway a new token for the same identity (kind 12, refresh).
   * @param {string} token
   * @returns {Promise<void>}
   */
  refresh(token) {
    return this.request(Kind.REFRESH, '', false, async () => ({
      codec: Codec.RAW,
      compressed: false,
      trace: null,
      body: new TextEncoder().encode(token),
    }));
  }

  /**
   * Closes the connection for good (no reconnect). Pending requests are rejected.
   * @param {number} [code] 1000 or 3000-4999
   * @param {string} [reason]
   */
  close(code = 1000, reason = '') {
    if (this.state === 'closed') return;
    this.dropSocket(code, reason);
    this.finish(code, reason || 'closed by the application');
  }

  // ---- internals ----------------------------------------------------------------------

  /**
   * Sends one request frame with a fresh message id and tracks its answer.
   * @param {number} kind
   * @param {string} route
   * @param {boolean} fireAndForget message id 0: no ack expected
   * @param {null | (() => Promise<{ codec: number, compressed: boolean, trace: any, body: Uint8Array }>)} prepare
   * @param {(ack?: any) => unknown} [onAck] runs on the ack frame; its result resolves the request
   * @returns {Promise<void>}
   */
  request(kind, route, fireAndForget, prepare, onAck) {
    if (this.state === 'closed') return Promise.reject(new RtError(0, 'client closed', 0n, 'closed'));
    return new Promise((resolve, reject) => {
      const send = () => {
        // Ids come from the connection's own counter (section 13.3); the frame must go out
        // on that same connection or not at all.
        const ws = this.ws;
        const id = fireAndForget ? 0n : BigInt(this.nextId++);
        const step = async () => {
          const parts = prepare ? await prepare() : { codec: Codec.RAW, compressed: false, trace: null, body: undefined };
          const bytes = encodeFrame({ kind, msgId: id, route, ...parts });
          if (this.state !== 'connected' || !ws || this.ws !== ws) {
            throw new RtError(0, 'connection lost before the frame was sent', id, 'disconnected');
          }
          if (id !== 0n) {
            const timer = this.clock.setTimeout(() => {
              if (this.pending.delete(id)) reject(new RtError(0, 'no answer in time', id, 'timeout'));
            }, this.options.requestTimeoutMs ?? 15000);
            this.pending.set(id, { resolve, reject, timer, onAck });
          }
          ws.send(bytes);
          if (id === 0n) resolve(undefined);
        };
        this.sendChain = this.sendChain.then(step).catch(reject);
      };
      if (this.state === 'connected') send();
      else this.waiting.push(send);
    });
  }

  async tokenValue() {
    const t = this.options.token;
    return typeof t === 'function' ? await t() : t;
  }

  open() {
    this.setState('connecting', { attempt: this.attempt });
    const seq = ++this.connSeq;
    this.tokenValue().then(
      (token) => {
        if (seq !== this.connSeq || this.state !== 'connecting') return;
        this.openSocket(token);
      },
      (err) => {
        if (seq !== this.connSeq) return;
        this.emit('error', err instanceof Error ? err : new Error(String(err)));
        this.lost(1006, 'token unavailable');
      },
    );
  }

  /** @param {string} token */
  openSocket(token) {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    const url = new URL(this.options.url);
    // Browsers cannot set headers on a WebSocket: the token travels as a query parameter
    // (section 1.2), and only that way.
    url.searchParams.set('token', token);
    url.searchParams.set('codec', this.codec === Codec.JSON ? 'json' : 'msgpack');
    const transports = this.options.transports ?? ['websocket'];
    if (this.options.recovery === true) {
      // The user stream's position (0:0 when unknown: the welcome then names the current
      // one), which also asks for positions on pushes (section 1.2).
      const user = this.positions.get('') ?? { epoch: 0, offset: 0 };
      url.searchParams.set('since', `${user.epoch}:${user.offset}`);
    }
    let ws;
    try {
      // Long-polling (section 1.4) behind the same interface, when the application allows it.
      ws =
        transports.length === 1 && transports[0] === 'websocket'
          ? new WS(url.toString())
          : /** @type {WebSocket} */ (
              /** @type {unknown} */ (
                new FallbackSocket(url.toString(), {
                  transports,
                  WebSocket: this.options.WebSocket,
                  fetch: this.options.fetch,
                  clock: this.clock,
                  random: this.random,
                  wsTimeoutMs: this.options.wsTimeoutMs,
                  upgradeDelayMs: this.options.upgradeDelayMs,
                })
              )
            );
    } catch (e) {
      this.emit('error', e instanceof Error ? e : new Error(String(e)));
      this.lost(1006, 'WebSocket constructor failed');
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => {
      const hello = encodeBody({ client: this.options.clientName ?? CLIENT_NAME }, this.codec);
      ws.send(encodeFrame({ kind: Kind.HELLO, codec: this.codec, body: hello }));
    };
    ws.onmessage = (ev) => this.onMessage(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.lost(ev.code, ev.reason ?? '');
    };
    // An error is always followed by a close event, which decides what happens next.
    ws.onerror = () => {};
  }

  /** @param {unknown} data */
  onMessage(data) {
    let frame;
    try {
      if (!(data instanceof ArrayBuffer) && !ArrayBuffer.isView(data)) {
        throw new FrameError('TextMessage');
      }
      frame = decodeFrame(
        data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
      );
    } catch (e) {
      // The two sides disagree about the protocol: stop and report (section 13.3).
      this.emit('error', e instanceof Error ? e : new Error(String(e)));
      this.dropSocket(1002, 'undecodable frame');
      this.finish(1002, `undecodable frame: ${e instanceof Error ? e.message : String(e)}`);
      return;
    }
    // Any frame proves the connection alive (section 13.2).
    this.clearTimer('dead');
    try {
      this.handle(frame);
    } catch (e) {
      this.emit('error', e instanceof Error ? e : new Error(String(e)));
    }
  }

  /** @param {import('./codec.js').Frame} frame */
  handle(frame) {
    switch (frame.kind) {
      case Kind.WELCOME:
        return this.onWelcome(readWelcome(decodeBody(frame.body, frame.codec)));
      case Kind.HEARTBEAT_ACK:
        return this.onHeartbeatAck(readHeartbeatAck(decodeBody(frame.body, frame.codec)));
      case Kind.ACK:
        return this.settle(frame.msgId, null, frame);
      case Kind.ERROR: {
        const { code, message } = readError(decodeBody(frame.body, frame.codec));
        const err = new RtError(code, message, frame.msgId);
        if (frame.msgId === 0n || !this.settle(frame.msgId, err)) this.emit('error', err);
        return;
      }
      case Kind.PUSH:
        return this.onPush(frame);
      case Kind.RECONNECT:
        return this.onReconnect(readReconnect(decodeBody(frame.body, frame.codec)));
      default:
        // A client-to-gateway kind from the gateway: nothing to do with it.
        return;
    }
  }

  /** @param {import('./codec.js').Welcome} welcome */
  onWelcome(welcome) {
    const reconnected = this.welcome !== null;
    if (welcome.recovery) this.afterRecovery(null, welcome.recovery, this.positions.has(''));
    this.welcome = welcome;
    this.nextId = 1;
    this.attempt = 0;
    this.reconnectAt = null;
    this.interval = welcome.heartbeat.baseMs;
    // The gateway counts the first beat from the session's start (section 7.2).
    this.lastBeatAt = this.clock.now();
    this.scheduleBeat();
    this.setState('connected', welcome);
    const waiting = this.waiting;
    this.waiting = [];
    for (const send of waiting) send();
    if (reconnected && this.options.rejoin !== false) {
      for (const room of [...this.rooms]) {
        this.join(room).catch((e) => {
          this.rooms.delete(room);
          this.emit('error', e);
        });
      }
    }
  }

  scheduleBeat() {
    this.clearTimer('beat');
    // Beat at 90% of the interval, counted from the previous beat, so network delay does
    // not make it late (section 13.2).
    const due = this.lastBeatAt + Math.floor(this.interval * 0.9);
    this.timers.beat = this.clock.setTimeout(() => this.beat(), Math.max(0, due - this.clock.now()));
  }

  beat() {
    this.timers.beat = null;
    if (this.state !== 'connected' || !this.ws) return;
    this.ws.send(encodeFrame({ kind: Kind.HEARTBEAT }));
    this.lastBeatAt = this.clock.now();
    if (this.timers.dead === null) {
      const grace = this.welcome?.heartbeat.graceMs ?? 5000;
      this.timers.dead = this.clock.setTimeout(() => {
        this.timers.dead = null;
        this.dropSocket(4001, 'heartbeat timeout');
        this.lost(4001, 'no frame from the gateway within grace_ms of a heartbeat');
      }, grace);
    }
    this.scheduleBeat();
  }

  /** @param {number} next */
  onHeartbeatAck(next) {
    // The client follows the latest ack and never computes the interval itself (7.2).
    this.interval = next;
    this.scheduleBeat();
  }

  /**
   * @param {bigint} id
   * @param {RtError | null} err
   * @param {import('./codec.js').Frame} [ack] the ack frame
   * @returns {boolean} whether a request was waiting for it
   */
  settle(id, err, ack) {
    const p = this.pending.get(id);
    if (!p) return false;
    this.pending.delete(id);
    this.clock.clearTimeout(p.timer);
    if (err) p.reject(err);
    else {
      let value;
      try {
        value = p.onAck?.(ack);
      } catch (e) {
        p.reject(e instanceof Error ? e : new Error(String(e)));
        return true;
      }
      p.resolve(value);
    }
    return true;
  }

  /**
   * Takes in a recovery answer for `room` (null: the user stream): the client's position
   * becomes the one the gateway named (after a replay, its last push; otherwise the
   * stream's latest, since what was missed is gone). `announce`: the client had a position,
   * so the application hears whether it recovered.
   * @param {string | null} room
   * @param {{ recovered: boolean, epoch: number, offset: number }} r
   * @param {boolean} announce
   */
  afterRecovery(room, r, announce) {
    const key = room ?? '';
    if (r.epoch !== 0) this.positions.set(key, { epoch: r.epoch, offset: r.offset });
    else this.positions.delete(key);
    if (announce) this.emit('recovered', { room, recovered: r.recovered, epoch: r.epoch, offset: r.offset });
  }

  /**
   * Remembers the position of a push from a history stream.
   * @param {import('./codec.js').Position} p
   */
  track(p) {
    const key = p.room ?? '';
    const known = this.positions.get(key);
    if (!known || known.epoch !== p.epoch || known.offset < p.offset) {
      this.positions.set(key, { epoch: p.epoch, offset: p.offset });
    }
  }

  /** @param {import('./codec.js').Frame} frame */
  onPush(frame) {
    const ws = this.ws;
    // Tracked on arrival, in order: a replay's pushes arrive before anything newer.
    if (frame.position) this.track(frame.position);
    const work = async () => {
      const bytes = frame.compressed
        ? await inflateRaw(frame.body, this.options.maxInflateBytes ?? 16 * 1024 * 1024)
        : frame.body;
      let acked = false;
      const ack = () => {
        // Only pushes with an id can be acked, each at most once, on the socket that got it.
        if (acked || frame.msgId === 0n || this.ws !== ws || !ws || this.state !== 'connected') return;
        acked = true;
        // The push's trace context goes into the ack so the receipt joins its trace (10.2).
        ws.send(encodeFrame({ kind: Kind.ACK, msgId: frame.msgId, trace: frame.trace }));
      };
      /** @type {Push} */
      const push = {
        route: frame.route,
        id: frame.msgId,
        codec: /** @type {'raw' | 'msgpack' | 'json'} */ (['raw', 'msgpack', 'json'][frame.codec]),
        body: decodeBody(bytes, frame.codec),
        bytes,
        receipt: frame.receipt,
        position: frame.position ?? null,
        ack,
      };
      this.emit('push', push);
      if (frame.receipt && this.options.autoReceipt !== false) ack();
    };
    this.pushChain = this.pushChain.then(work).catch((e) => this.emit('error', e));
  }

  /** @param {{ delayMs: number, reason: string }} r */
  onReconnect(r) {
    this.reconnectAt = this.clock.now() + r.delayMs;
    this.emit('reconnect', r);
    // Connect again after delay_ms whether or not the gateway closed the old connection
    // by then (section 13.1).
    this.clearTimer('retry');
    this.timers.retry = this.clock.setTimeout(() => {
      this.timers.retry = null;
      if (this.state === 'connected' && this.ws) {
        this.dropSocket(1000, 'reconnect');
        this.lost(4000, 'reconnect requested by the gateway');
      }
    }, r.delayMs);
  }

  /**
   * Detaches and closes the current socket; its close event will not be seen.
   * @param {number} code
   * @param {string} reason
   */
  dropSocket(code, reason) {
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      // Browsers accept only 1000 and 3000-4999 from scripts.
      try {
        ws.close();
      } catch {
        // Already closed.
      }
    }
  }

  /**
   * The connection ended with `code`: decide between another attempt and the end.
   * @param {number} code
   * @param {string} reason
   */
  lost(code, reason) {
    if (this.state === 'closed') return;
    this.stopSession(new RtError(0, `connection lost (${code})`, 0n, 'disconnected'));
    const action = closeAction(code);
    const canRetry =
      this.options.reconnect !== false &&
      (action === 'reconnect' || (action === 'new_token' && typeof this.options.token === 'function'));
    if (!canRetry) {
      this.finish(code, reason);
      return;
    }
    let delayMs;
    if (this.reconnectAt !== null) {
      // A reconnect frame came: its delay replaces the backoff for this one attempt.
      delayMs = Math.max(0, this.reconnectAt - this.clock.now());
      this.reconnectAt = null;
    } else {
      delayMs = backoffDelay(this.attempt, this.options.backoff, this.random);
      this.attempt++;
    }
    this.clearTimer('retry');
    this.setState('disconnected', { code, reason, codeName: /** @type {Record<number, string>} */ (CLOSE_NAMES)[code], delayMs });
    this.timers.retry = this.clock.setTimeout(() => {
      this.timers.retry = null;
      if (this.state === 'disconnected') this.open();
    }, delayMs);
  }

  /** @param {Error} err */
  stopSession(err) {
    this.clearTimer('beat');
    this.clearTimer('dead');
    for (const [, p] of this.pending) {
      this.clock.clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  finish(code, reason) {
    this.stopSession(new RtError(0, `client closed (${code})`, 0n, 'closed'));
    this.clearTimer('retry');
    this.connSeq++;
    const waiting = this.waiting;
    this.waiting = [];
    this.setState('closed', { code, reason, codeName: /** @type {Record<number, string>} */ (CLOSE_NAMES)[code] });
    // Requests queued for a welcome that will never come fail now.
    for (const send of waiting) send();
  }

  /** @param {'beat' | 'dead' | 'retry'} name */
  clearTimer(name) {
    if (this.timers[name] !== null) {
      this.clock.clearTimeout(this.timers[name]);
      this.timers[name] = null;
    }
  }

  /**
   * @param {'connecting' | 'connected' | 'disconnected' | 'closed'} state
   * @param {unknown} detail
   */
  setState(state, detail) {
    this.state = state;
    this.emit(state, detail);
  }

  /** @param {string} type @param {unknown} detail */
  emit(type, detail) {
    this.dispatchEvent(makeEvent(type, detail));
  }
}
