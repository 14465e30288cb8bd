// Transports: a WebSocket-shaped object that opens a WebSocket when it can, falls back to
// HTTP long-polling when it cannot (docs/protocol.md section 1.4), and moves a long-poll
// session onto a WebSocket when one gets through, without losing the session.
//
// The client (client.js) sees one interface whatever carries its frames: `send(bytes)`,
// `close(code, reason)`, and the `onopen` / `onmessage` / `onclose` / `onerror` handlers of
// a WebSocket. `transport` says which one is in use.
//
// Time, fetch and the WebSocket constructor are injected so tests drive them by hand.

/** Length of a batch record's length prefix (section 1.4). */
const RECORD_HEADER = 4;

/**
 * A batch: each frame prefixed by its length (u32, big-endian).
 * @param {Uint8Array[]} frames
 */
export function encodeBatch(frames) {
  const size = frames.reduce((n, f) => n + RECORD_HEADER + f.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const f of frames) {
    view.setUint32(at, f.length);
    out.set(f, at + RECORD_HEADER);
    at += RECORD_HEADER + f.length;
  }
  return out;
}

/**
 * The frames of a batch (views into `batch`); throws on a truncated record.
 * @param {Uint8Array} batch
 */
export function decodeBatch(batch) {
  const view = new DataView(batch.buffer, batch.byteOffset, batch.byteLength);
  /** @type {Uint8Array[]} */
  const frames = [];
  let at = 0;
  while (at < batch.length) {
    if (batch.length - at < RECORD_HEADER) throw new Error(`batch truncated at byte ${at}`);
    const len = view.getUint32(at);
    const end = at + RECORD_HEADER + len;
    if (end > batch.length) throw new Error(`batch truncated at byte ${at}`);
    frames.push(batch.subarray(at + RECORD_HEADER, end));
    at = end;
  }
  return frames;
}

/**
 * The long-poll endpoint for a WebSocket endpoint: same host, `http(s)`, path `/lp`.
 * @param {string} wsUrl
 */
export function longPollUrl(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
  url.pathname = url.pathname.replace(/\/ws\/?$/, '') + '/lp';
  return url;
}

/**
 * A close code for a refused long-poll request (section 1.4): a token problem is 4502
 * (new token), the end of a session its own code, anything else a lost connection (1006).
 * @param {number} status
 * @param {any} body
 */
function closeFor(status, body) {
  if (status === 410 && body && typeof body.code === 'number') return [body.code, String(body.reason ?? '')];
  if (status === 401 || status === 403) return [4502, String(body?.detail ?? 'unauthorized')];
  return [1006, `long-poll HTTP ${status}${body?.error ? ` ${body.error}` : ''}`];
}

/**
 * @typedef {object} TransportOptions
 * @property {Array<'websocket' | 'longpoll'>} transports in order of preference
 * @property {typeof WebSocket} [WebSocket]
 * @property {typeof fetch} [fetch]
 * @property {import('./client.js').Clock} clock
 * @property {() => number} random
 * @property {number} [wsTimeoutMs] a WebSocket not open after this is given up; 10000
 * @property {number} [upgradeDelayMs] first WebSocket retry after falling back; 2000,
 *   doubling per failure up to 60 s
 */

/** A WebSocket-shaped connection over WebSocket or long-polling. */
export class FallbackSocket {
  /**
   * @param {string} url the WebSocket URL with `token` and `codec` in its query
   * @param {TransportOptions} options
   */
  constructor(url, options) {
    this.url = url;
    this.options = options;
    /** @type {'websocket' | 'longpoll' | null} */
    this.transport = null;
    this.binaryType = 'arraybuffer';
    /** @type {((ev?: any) => void) | null} */ this.onopen = null;
    /** @type {((ev: { data: Uint8Array }) => void) | null} */ this.onmessage = null;
    /** @type {((ev: { code: number, reason: string }) => void) | null} */ this.onclose = null;
    /** @type {((ev?: any) => void) | null} */ this.onerror = null;
    /** @type {WebSocket | null} */ this.ws = null;
    this.sid = '';
    this.ended = false;
    /** Frames waiting for a POST (or for the upgrade to finish). @type {Uint8Array[]} */
    this.queue = [];
    this.posting = false;
    /** Sends held while a WebSocket tries to take the session over. */
    this.paused = false;
    /** @type {Promise<void> | null} the poll in flight */
    this.polling = null;
    this.upgradeFailures = 0;
    /** @type {unknown} */ this.upgradeTimer = null;
    const transports = options.transports;
    if (transports[0] === 'websocket') this.openWebSocket(transports.includes('longpoll'));
    else this.handshake();
  }

  get fetch() {
    return this.options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /**
   * @param {boolean} fallback fall back to long-polling if it fails
   */
  openWebSocket(fallback) {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(this.url);
    } catch {
      if (fallback) this.handshake();
      else this.end(1006, 'WebSocket constructor failed');
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let opened = false;
    const timer = this.options.clock.setTimeout(() => {
      if (opened || this.ws !== ws) return;
      this.detach(ws);
      if (fallback) this.handshake();
      else this.end(1006, 'WebSocket did not open in time');
    }, this.options.wsTimeoutMs ?? 10000);
    ws.onopen = () => {
      opened = true;
      this.options.clock.clearTimeout(timer);
      this.transport = 'websocket';
      this.onopen?.();
    };
    ws.onmessage = (ev) => this.onmessage?.(ev);
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      this.options.clock.clearTimeout(timer);
      if (this.ws !== ws) return;
      this.ws = null;
      if (!opened && fallback) this.handshake();
      else this.end(ev.code, ev.reason ?? '');
    };
  }

  /** @param {WebSocket} ws */
  detach(ws) {
    if (this.ws === ws) this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close();
    } catch {
      // Already closed.
    }
  }

  /** The long-poll URL for this session, with the token. @param {boolean} withSid */
  pollUrl(withSid) {
    const url = longPollUrl(this.url);
    const from = new URL(this.url);
    for (const key of ['token', 'codec']) {
      const v = from.searchParams.get(key);
      if (v !== null) url.searchParams.set(key, v);
    }
    if (withSid) {
      url.searchParams.delete('codec');
      url.searchParams.set('sid', this.sid);
    }
    return url.toString();
  }

  async handshake() {
    if (this.ended) return;
    let res;
    let body;
    try {
      res = await this.fetch(this.pollUrl(false), { method: 'GET', cache: 'no-store' });
      body = await res.json().catch(() => null);
    } catch (e) {
      this.end(1006, `long-poll handshake failed: ${e instanceof Error ? e.message : String(e)}`);
      return;
    }
    if (this.ended) return;
    if (res.status !== 200 || !body || typeof body.sid !== 'string') {
      const [code, reason] = closeFor(res.status, body);
      this.end(code, reason);
      return;
    }
    this.sid = body.sid;
    this.transport = 'longpoll';
    this.onopen?.();
    this.pollLoop();
    if (this.options.transports.includes('websocket') && (body.upgrades ?? []).includes('websocket')) {
      this.scheduleUpgrade();
    }
  }

  async pollLoop() {
    while (!this.ended && this.transport === 'longpoll') {
      this.polling = this.pollOnce();
      const go = await this.polling;
      this.polling = null;
      if (!go) return;
    }
  }

  /** One poll; resolves whether to poll again. */
  async pollOnce() {
    let res;
    try {
      res = await this.fetch(this.pollUrl(true), { method: 'GET', cache: 'no-store' });
    } catch (e) {
      this.end(1006, `poll failed: ${e instanceof Error ? e.message : String(e)}`);
      return false;
    }
    if (this.ended) return false;
    if (res.status === 200) {
      const batch = new Uint8Array(await res.arrayBuffer());
      let frames;
      try {
        frames = decodeBatch(batch);
      } catch (e) {
        this.end(1002, e instanceof Error ? e.message : String(e));
        return false;
      }
      for (const data of frames) {
        if (this.ended) return false;
        this.onmessage?.({ data });
      }
      return true;
    }
    const body = await res.json().catch(() => null);
    // The session moved to a WebSocket: the frames from here on come over it.
    if (res.status === 409 && body?.error === 'upgraded') return false;
    const [code, reason] = closeFor(res.status, body);
    this.end(code, reason);
    return false;
  }

  /** @param {Uint8Array} bytes one frame */
  send(bytes) {
    if (this.ended) return;
    if (this.transport === 'websocket' && this.ws && !this.paused) {
      this.ws.send(bytes);
      return;
    }
    this.queue.push(bytes);
    this.flush();
  }

  async flush() {
    if (this.posting || this.paused || this.ended || this.transport !== 'longpoll' || this.queue.length === 0) return;
    this.posting = true;
    const frames = this.queue;
    this.queue = [];
    try {
      const res = await this.fetch(this.pollUrl(true), {
        method: 'POST',
        body: encodeBatch(frames),
        headers: { 'content-type': 'application/octet-stream' },
      });
      if (res.status !== 204 && res.status !== 200) {
        const body = await res.json().catch(() => null);
        const [code, reason] = closeFor(res.status, body);
        this.end(code, reason);
        return;
      }
    } catch (e) {
      this.end(1006, `send failed: ${e instanceof Error ? e.message : String(e)}`);
      return;
    } finally {
      this.posting = false;
      this.onPosted?.();
    }
    this.flush();
  }

  scheduleUpgrade() {
    const base = this.options.upgradeDelayMs ?? 2000;
    const delay = Math.min(60000, base * 2 ** Math.min(this.upgradeFailures, 10));
    this.upgradeTimer = this.options.clock.setTimeout(() => {
      this.upgradeTimer = null;
      this.tryUpgrade();
    }, delay);
  }

  /**
   * Opens a WebSocket naming the session (`/ws?sid=`). Sends are held meanwhile so no
   * frame goes by POST after the gateway moved the session; once open, the poll in flight
   * is finished first (its frames come before anything on the WebSocket).
   */
  async tryUpgrade() {
    if (this.ended || this.transport !== 'longpoll') return;
    this.paused = true;
    if (this.posting) await new Promise((resolve) => (this.onPosted = () => resolve(undefined)));
    this.onPosted = null;
    if (this.ended) return;
    const url = new URL(this.url);
    url.searchParams.delete('codec');
    url.searchParams.set('sid', this.sid);
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(url.toString());
    } catch {
      this.upgradeFailed();
      return;
    }
    ws.binaryType = 'arraybuffer';
    /** @type {any[]} */
    const early = [];
    let opened = false;
    const timer = this.options.clock.setTimeout(() => {
      if (opened) return;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch {
        // Already closed.
      }
      this.upgradeFailed();
    }, this.options.wsTimeoutMs ?? 10000);
    ws.onerror = () => {};
    ws.onmessage = (ev) => early.push(ev);
    ws.onclose = (ev) => {
      this.options.clock.clearTimeout(timer);
      if (!opened) this.upgradeFailed();
      else if (this.ws === ws) {
        this.ws = null;
        this.end(ev.code, ev.reason ?? '');
      }
    };
    ws.onopen = async () => {
      opened = true;
      this.options.clock.clearTimeout(timer);
      if (this.ended) return;
      this.transport = 'websocket';
      this.ws = ws;
      if (this.polling) await this.polling;
      if (this.ended) return;
      for (const ev of early) this.onmessage?.(ev);
      ws.onmessage = (ev) => this.onmessage?.(ev);
      this.paused = false;
      const queued = this.queue;
      this.queue = [];
      for (const bytes of queued) ws.send(bytes);
    };
  }

  upgradeFailed() {
    this.upgradeFailures++;
    this.paused = false;
    this.flush();
    if (!this.ended) this.scheduleUpgrade();
  }

  /**
   * Ends the connection from this side (like `WebSocket.close`); no close event follows.
   * @param {number} [code]
   * @param {string} [reason]
   */
  close(code = 1000, reason = '') {
    if (this.ended) return;
    this.ended = true;
    this.stopTimers();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        try {
          ws.close();
        } catch {
          // Already closed.
        }
      }
    }
    if (this.sid && this.transport === 'longpoll') {
      this.fetch(this.pollUrl(true), { method: 'DELETE' }).catch(() => {});
    }
  }

  stopTimers() {
    if (this.upgradeTimer !== null) {
      this.options.clock.clearTimeout(this.upgradeTimer);
      this.upgradeTimer = null;
    }
  }

  /**
   * The connection is over: one close event.
   * @param {number} code
   * @param {string} reason
   */
  end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    this.stopTimers();
    if (this.ws) this.detach(this.ws);
    this.onclose?.({ code, reason });
  }
}
