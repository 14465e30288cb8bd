// The long-poll fallback and the upgrade with a fake clock, a fake fetch and a fake
// WebSocket (docs/protocol.md section 1.4): the batch format, falling back when the
// WebSocket fails, POSTed frames, and the move to a WebSocket that keeps the order of
// frames.

import test from 'node:test';
import assert from 'node:assert/strict';

import { Client } from '../client.js';
import { Kind, decodeFrame, encodeFrame } from '../codec.js';
import { decodeBatch, encodeBatch, longPollUrl } from '../transport.js';
import { FakeClock, FakeWebSocket, tick, until } from './fakes.js';

test('a batch is length-prefixed frames, and a truncated one is refused', () => {
  const frames = [Uint8Array.of(1, 2, 3), new Uint8Array(0), new Uint8Array(300).fill(7)];
  const batch = encodeBatch(frames);
  assert.deepEqual([...batch.subarray(0, 7)], [0, 0, 0, 3, 1, 2, 3]);
  assert.deepEqual(decodeBatch(batch).map((f) => [...f]), frames.map((f) => [...f]));
  assert.throws(() => decodeBatch(batch.subarray(0, batch.length - 1)), /truncated/);
  assert.equal(longPollUrl('wss://h:1/rt/ws?x=1').toString(), 'https://h:1/rt/lp?x=1');
});

/** A gateway's /lp as a test plays it: requests are recorded, answers queued per kind. */
class FakeHttp {
  constructor() {
    this.requests = [];
    /** @type {Array<(r: any) => void>} */
    this.polls = [];
    this.fetch = async (url, init = {}) => {
      const u = new URL(url);
      const req = { method: init.method ?? 'GET', url: u, body: init.body };
      this.requests.push(req);
      if (req.method === 'GET' && !u.searchParams.has('sid')) {
        return json(200, { sid: '7.' + 'ab'.repeat(16), upgrades: ['websocket'], pingInterval: 10000, pingTimeout: 5000 });
      }
      if (req.method === 'POST' || req.method === 'DELETE') return new Response(null, { status: 204 });
      return new Promise((resolve) => this.polls.push(resolve));
    };
  }

  /** Answers the oldest waiting poll with `frames` (or a status and JSON body). */
  answer(frames, status = 200, body = null) {
    const resolve = this.polls.shift();
    assert.ok(resolve, 'a poll is waiting');
    if (status !== 200) resolve(json(status, body));
    else resolve(new Response(encodeBatch(frames.map((f) => encodeFrame(f))), { status: 200 }));
  }

  posted() {
    return this.requests
      .filter((r) => r.method === 'POST')
      .flatMap((r) => decodeBatch(r.body).map((f) => decodeFrame(f)));
  }
}

function json(status, body) {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
}

function welcomeFrame() {
  const ws = new FakeWebSocket('ws://x/ws');
  let frame;
  ws.onmessage = (ev) => (frame = decodeFrame(new Uint8Array(ev.data)));
  ws.welcome();
  FakeWebSocket.instances.pop();
  return frame;
}

test('a WebSocket that fails falls back to long-polling, and the session moves to a WebSocket later', async () => {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const http = new FakeHttp();
  const client = new Client({
    url: 'ws://gw.test/ws',
    token: 'tok',
    transports: ['websocket', 'longpoll'],
    WebSocket: FakeWebSocket,
    fetch: http.fetch,
    clock,
    random: () => 0.5,
    upgradeDelayMs: 1000,
  });
  const pushes = [];
  client.addEventListener('push', (e) => pushes.push(new TextDecoder().decode(e.detail.bytes)));
  const connected = client.connect();
  await tick();
  // The WebSocket is refused (a proxy that strips Upgrade): fall back.
  FakeWebSocket.last().serverClose(1006);
  await until(() => http.polls.length === 1);
  const hs = http.requests[0];
  assert.equal(hs.url.pathname, '/lp');
  assert.equal(hs.url.searchParams.get('token'), 'tok');
  assert.equal(client.transport, 'longpoll');
  http.answer([welcomeFrame()]);
  const welcome = await connected;
  assert.equal(welcome.userId, 'alice');

  // Frames go out by POST (the hello first), in batches, with the session's sid.
  const acked = client.publish('chat.send', { text: 'hi' });
  await until(() => http.posted().some((f) => f.kind === Kind.PUBLISH));
  const post = http.requests.find((r) => r.method === 'POST');
  assert.equal(post.url.searchParams.get('sid'), '7.' + 'ab'.repeat(16));
  assert.deepEqual(http.posted().map((f) => f.kind), [Kind.HELLO, Kind.PUBLISH]);
  await until(() => http.polls.length === 1);
  http.answer([{ kind: Kind.ACK, msgId: 1n }, { kind: Kind.PUSH, msgId: 5n, route: 'r', body: new TextEncoder().encode('p1') }]);
  await acked;
  await until(() => pushes.length === 1);

  // The upgrade: a WebSocket naming the session opens; the poll in flight finishes first.
  await until(() => http.polls.length === 1);
  clock.advance(1000);
  const up = FakeWebSocket.last();
  assert.equal(up.url.searchParams.get('sid'), '7.' + 'ab'.repeat(16));
  up.open();
  up.deliver({ kind: Kind.PUSH, msgId: 7n, route: 'r', body: new TextEncoder().encode('p3') });
  await tick();
  http.answer([{ kind: Kind.PUSH, msgId: 6n, route: 'r', body: new TextEncoder().encode('p2') }]);
  await until(() => pushes.length === 3);
  assert.deepEqual(pushes, ['p1', 'p2', 'p3'], 'the poll before the WebSocket, in order');
  assert.equal(client.transport, 'websocket');
  // No poll after the move; frames now go over the WebSocket.
  await tick();
  assert.equal(http.polls.length, 0);
  const joined = client.join('lobby');
  await until(() => up.sentOf(Kind.JOIN).length === 1);
  up.ack(up.sentOf(Kind.JOIN)[0].msgId);
  await joined;
  client.close();
});

test('an upgrade that fails keeps polling, and a closed session reports its code', async () => {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const http = new FakeHttp();
  const client = new Client({
    url: 'ws://gw.test/ws',
    token: 'tok',
    transports: ['longpoll', 'websocket'],
    WebSocket: FakeWebSocket,
    fetch: http.fetch,
    clock,
    random: () => 0.5,
    reconnect: false,
    upgradeDelayMs: 1000,
  });
  const closed = new Promise((resolve) => client.addEventListener('closed', (e) => resolve(e.detail)));
  const connected = client.connect();
  await until(() => http.polls.length === 1);
  assert.equal(FakeWebSocket.instances.length, 0, 'long-polling first: no WebSocket tried');
  http.answer([welcomeFrame()]);
  await connected;
  await until(() => http.polls.length === 1);
  clock.advance(1000);
  // Another replica holds the session: 421, the client keeps polling and tries later.
  FakeWebSocket.last().serverClose(1006);
  await tick();
  assert.equal(client.transport, 'longpoll');
  assert.deepEqual(clock.pending().includes(2000), true, 'next try after twice the delay');
  http.answer([], 410, { error: 'closed', code: 4503, reason: 'kicked' });
  const d = await closed;
  assert.equal(d.code, 4503);
});
