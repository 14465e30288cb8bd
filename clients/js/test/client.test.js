// The connection logic with a fake clock and a fake WebSocket: heartbeats that follow the
// gateway's acks, liveness, requests settled by ack or error, receipts, compressed pushes,
// reconnect frames, backoff and close codes (docs/protocol.md sections 7 and 13).

import test from 'node:test';
import assert from 'node:assert/strict';

import { Client, RtError, backoffDelay, CLIENT_NAME } from '../client.js';
import { Codec, Kind, decodeBody, deflateRaw, encodeBody, parseTraceparent } from '../codec.js';
import { FakeClock, FakeWebSocket, tick, until } from './fakes.js';

/** A client on fake time; `events` records every event type (with detail) in order. */
function setup(options = {}) {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const client = new Client({
    url: 'ws://gw.test/ws',
    token: 'tok-1',
    WebSocket: FakeWebSocket,
    clock,
    random: () => 0.5, // jitter factor exactly 1: delays are the formula's ceiling
    ...options,
  });
  const events = [];
  for (const type of ['connecting', 'connected', 'disconnected', 'closed', 'push', 'reconnect', 'error']) {
    client.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  return { client, clock, events };
}

/** Connects and plays the gateway up to the welcome. */
async function connected(options = {}, welcome = {}) {
  const s = setup(options);
  const first = s.client.connect();
  await tick();
  const ws = FakeWebSocket.last();
  ws.open();
  ws.welcome(welcome);
  const w = await first;
  return { ...s, ws, welcome: w };
}

const types = (events) => events.map(([t]) => t);

test('connect: token and codec in the query, hello first, welcome read', async () => {
  const { client, ws, welcome, events } = await connected({ codec: 'json' });
  assert.equal(ws.url.pathname, '/ws');
  assert.equal(ws.url.searchParams.get('token'), 'tok-1');
  assert.equal(ws.url.searchParams.get('codec'), 'json');
  assert.equal(ws.binaryType, 'arraybuffer');
  const [hello] = ws.sent;
  assert.equal(hello.kind, Kind.HELLO);
  assert.equal(hello.codec, Codec.JSON);
  assert.deepEqual(decodeBody(hello.body, hello.codec), { client: CLIENT_NAME });
  assert.equal(welcome.socketId, '137465797017604096');
  assert.equal(client.state, 'connected');
  assert.deepEqual(types(events), ['connecting', 'connected']);
});

test('heartbeats: at 90% of the interval, following each ack', async () => {
  const { clock, ws } = await connected();
  clock.advance(8999);
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 0);
  clock.advance(1);
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 1, 'first beat at 9000 ms');
  const beat = ws.sentOf(Kind.HEARTBEAT)[0];
  assert.deepEqual([beat.msgId, beat.route, beat.body.length], [0n, '', 0]);
  clock.advance(100);
  ws.heartbeatAck(15000);
  // Next beat 13500 ms after the previous beat, not after the ack.
  clock.advance(13399);
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 1);
  clock.advance(1);
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 2);
  ws.heartbeatAck(10000);
  clock.advance(9000);
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 3, 'an ack that shrinks the interval is followed too');
});

test('liveness: no frame within grace_ms of a heartbeat drops the connection and reconnects', async () => {
  const { client, clock, ws, events } = await connected();
  clock.advance(9000);
  ws.heartbeatAck(10000); // a frame: alive
  clock.advance(9000); // second beat
  assert.equal(ws.sentOf(Kind.HEARTBEAT).length, 2);
  clock.advance(4999);
  assert.equal(client.state, 'connected');
  clock.advance(1);
  assert.ok(ws.closed, 'the dead socket was closed');
  assert.equal(client.state, 'disconnected');
  const [, detail] = events.find(([t]) => t === 'disconnected');
  assert.deepEqual([detail.code, detail.delayMs], [4001, 100]);
  clock.advance(100);
  await tick();
  assert.equal(FakeWebSocket.instances.length, 2, 'a new attempt after the backoff');
});

test('publish resolves on the ack and rejects on the error frame', async () => {
  const { client, ws } = await connected();
  const ok = client.publish('chat.send', { text: 'hi' });
  const bad = client.publish('chat.send', 'x', { codec: 'json' });
  await tick();
  const [p1, p2] = ws.sentOf(Kind.PUBLISH);
  assert.deepEqual([p1.msgId, p1.route, p1.codec], [1n, 'chat.send', Codec.MSGPACK]);
  assert.deepEqual(decodeBody(p1.body, p1.codec), { text: 'hi' });
  assert.deepEqual([p2.msgId, p2.codec], [2n, Codec.JSON]);
  ws.ack(1n);
  ws.error(2n, 503, 'bus down');
  await ok;
  await assert.rejects(bad, (e) => e instanceof RtError && e.code === 503 && e.codeName === 'unavailable' && e.msgId === 2n);
  // Raw bytes go as they are; fire and forget uses id 0.
  await client.publish('raw.bytes', Uint8Array.from([1, 2, 3]), { ack: false });
  const p3 = ws.sentOf(Kind.PUBLISH)[2];
  assert.deepEqual([p3.msgId, p3.codec, [...p3.body]], [0n, Codec.RAW, [1, 2, 3]]);
  // Routes the gateway would close the session for are refused before sending.
  for (const bad of ['', 'a..b', 'a b', 'r'.repeat(129)]) {
    await assert.rejects(client.publish(bad, {}), (e) => e.code === 401, bad);
  }
  await tick();
  assert.equal(ws.sentOf(Kind.PUBLISH).length, 3);
  assert.ok(!ws.closed);
});

test('publish: compression, trace context, body limit, queued until the welcome', async () => {
  const s = setup();
  s.client.connect();
  const early = s.client.publish('early.one', { n: 1 }, { compress: true, traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' });
  await tick();
  const ws = FakeWebSocket.last();
  ws.open();
  assert.equal(ws.sentOf(Kind.PUBLISH).length, 0, 'nothing before the welcome');
  ws.welcome({ max_body_bytes: 64 });
  await until(() => ws.sentOf(Kind.PUBLISH).length === 1);
  const [p] = ws.sentOf(Kind.PUBLISH);
  assert.ok(p.compressed);
  assert.deepEqual(p.trace, parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'));
  ws.ack(p.msgId);
  await early;
  await assert.rejects(s.client.publish('big.one', 'x'.repeat(100)), (e) => e.code === 413);
});

test('join and leave: acks, refusals, and rejoin after a reconnect', async () => {
  const { client, ws, clock } = await connected();
  const j = client.join('chat.lobby');
  const denied = client.join('admin');
  await tick();
  const [j1, j2] = ws.sentOf(Kind.JOIN);
  assert.deepEqual([j1.route, j1.msgId, j1.body.length], ['chat.lobby', 1n, 0]);
  ws.ack(j1.msgId);
  ws.error(j2.msgId, 403, 'not allowed');
  await j;
  await assert.rejects(denied, (e) => e.code === 403 && e.codeName === 'forbidden');
  assert.deepEqual([...client.rooms], ['chat.lobby']);
  await assert.rejects(client.join('a..b'), (e) => e.code === 401);

  // A join still waiting when the connection drops has an unknown outcome.
  const lost = client.join('chat.other');
  await tick();
  ws.serverClose(1006);
  await assert.rejects(lost, (e) => e.codeName === 'disconnected');
  clock.advance(100);
  await tick();
  const ws2 = FakeWebSocket.last();
  assert.notEqual(ws2, ws);
  ws2.open();
  ws2.welcome({ socket_id: '137465797017604097' });
  await tick();
  const rejoin = ws2.sentOf(Kind.JOIN);
  // Only the acked room; message ids restart at 1 on the new connection (section 13.3).
  assert.deepEqual(rejoin.map((f) => [f.route, f.msgId]), [['chat.lobby', 1n]]);
});

test('pushes: decoded by their codec, receipts sent only when asked, after the listeners', async () => {
  const { client, ws } = await connected();
  const seen = [];
  client.addEventListener('push', (e) => {
    seen.push([e.detail.route, e.detail.id, e.detail.codec, e.detail.body, ws.sentOf(Kind.ACK).length]);
  });
  const trace = parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
  ws.deliver({ kind: Kind.PUSH, route: 'greet', msgId: 91n, codec: Codec.JSON, receipt: true, trace, body: encodeBody({ hi: 1 }, Codec.JSON) });
  ws.deliver({ kind: Kind.PUSH, route: 'plain', msgId: 92n, codec: Codec.MSGPACK, body: encodeBody([1, 2], Codec.MSGPACK) });
  ws.deliver({ kind: Kind.PUSH, msgId: 0n, receipt: true, body: Uint8Array.from([9]) });
  await tick();
  assert.deepEqual(seen, [
    ['greet', 91n, 'json', { hi: 1 }, 0],
    ['plain', 92n, 'msgpack', [1, 2], 1],
    ['', 0n, 'raw', Uint8Array.from([9]), 1],
  ]);
  const acks = ws.sentOf(Kind.ACK);
  assert.equal(acks.length, 1, 'only the push that asked for a receipt, and never id 0');
  assert.equal(acks[0].msgId, 91n);
  assert.deepEqual(acks[0].trace, trace, 'the ack carries the push trace context');
});

test('autoReceipt false: the application acks, at most once', async () => {
  const { client, ws } = await connected({ autoReceipt: false });
  let push;
  client.addEventListener('push', (e) => (push = e.detail));
  ws.deliver({ kind: Kind.PUSH, msgId: 5n, receipt: true, body: new Uint8Array(0) });
  await tick();
  assert.equal(ws.sentOf(Kind.ACK).length, 0);
  push.ack();
  push.ack();
  assert.equal(ws.sentOf(Kind.ACK).length, 1);
});

test('compressed pushes are inflated, and order is kept', async () => {
  const { client, ws } = await connected();
  const bodies = [];
  client.addEventListener('push', (e) => bodies.push(e.detail.body));
  const big = { text: 'z'.repeat(5000) };
  const packed = await deflateRaw(encodeBody(big, Codec.MSGPACK));
  ws.deliver({ kind: Kind.PUSH, msgId: 1n, codec: Codec.MSGPACK, compressed: true, body: packed });
  ws.deliver({ kind: Kind.PUSH, msgId: 2n, codec: Codec.JSON, body: encodeBody('second', Codec.JSON) });
  await until(() => bodies.length === 2);
  assert.deepEqual(bodies, [big, 'second']);

  // A bomb beyond maxInflateBytes is refused and reported, not delivered.
  const s = await connected({ maxInflateBytes: 1000 });
  const errors = [];
  s.client.addEventListener('error', (e) => errors.push(e.detail));
  s.ws.deliver({ kind: Kind.PUSH, msgId: 1n, compressed: true, body: await deflateRaw(new Uint8Array(5000)) });
  await until(() => errors.length === 1);
  assert.ok(errors[0] instanceof RangeError);
});

test('reconnect frame: wait delay_ms from its receipt; the close that follows adds no backoff', async () => {
  const { client, ws, clock, events } = await connected();
  ws.reconnect(250);
  clock.advance(50);
  ws.serverClose(4000, 'server shutting down');
  const [, d] = events.find(([t]) => t === 'disconnected');
  assert.equal(d.delayMs, 200, 'the rest of the 250 ms');
  clock.advance(199);
  await tick();
  assert.equal(FakeWebSocket.instances.length, 1);
  clock.advance(1);
  await tick();
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.equal(client.state, 'connecting');
  // That attempt fails: normal backoff from n = 0.
  FakeWebSocket.last().serverClose(1006);
  assert.equal(events.filter(([t]) => t === 'disconnected').at(-1)[1].delayMs, 100);
});

test('reconnect frame: if the gateway has not closed after delay_ms, the client goes anyway', async () => {
  const { ws, clock, events } = await connected();
  ws.reconnect(300, 'rebalance');
  assert.deepEqual(events.find(([t]) => t === 'reconnect')[1], { delayMs: 300, reason: 'rebalance' });
  clock.advance(300);
  assert.ok(ws.closed);
  await tick();
  assert.equal(FakeWebSocket.instances.length, 2);
});

test('backoff: doubling from 100 ms to the 30 s cap with 0.3 jitter, reset by a welcome', async () => {
  assert.deepEqual([0, 1, 2, 3, 8, 9, 20, 2000].map((n) => backoffDelay(n, {}, () => 0.5)), [100, 200, 400, 800, 25600, 30000, 30000, 30000]);
  assert.equal(backoffDelay(0, {}, () => 0), 70);
  assert.equal(backoffDelay(0, {}, () => 0.999999), 130);
  assert.equal(backoffDelay(10, {}, () => 0), 21000);
  assert.equal(backoffDelay(3, { jitter: 'full' }, () => 0.5), 400);
  assert.equal(backoffDelay(3, { jitter: 'full' }, () => 0), 0);

  const { client, clock, events } = setup();
  client.connect();
  const delays = [];
  for (let i = 0; i < 5; i++) {
    await tick();
    FakeWebSocket.last().serverClose(1006);
    delays.push(events.at(-1)[1].delayMs);
    clock.advance(delays.at(-1));
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1600]);
  await tick();
  const ws = FakeWebSocket.last();
  ws.open();
  ws.welcome();
  ws.serverClose(4001);
  assert.equal(events.at(-1)[1].delayMs, 100, 'reset after a welcome');
});

test('terminal close codes stop the client and fail pending requests', async () => {
  for (const code of [4500, 4501, 4503, 4504, 4505, 4999]) {
    const { client, ws, clock, events } = await connected();
    const p = client.publish('a.b', 1);
    await tick();
    ws.serverClose(code, 'bye');
    await assert.rejects(p, (e) => e.codeName === 'disconnected');
    assert.equal(client.state, 'closed', String(code));
    assert.deepEqual(events.at(-1), ['closed', { code, reason: 'bye', codeName: events.at(-1)[1].codeName }]);
    clock.advance(120000);
    await tick();
    assert.equal(FakeWebSocket.instances.length, 1, `no reconnect after ${code}`);
    await assert.rejects(client.publish('a.b', 1), (e) => e.codeName === 'closed');
  }
});

test('4502: stop with a fixed token; with a token function, fetch a new one and reconnect', async () => {
  const fixed = await connected();
  fixed.ws.serverClose(4502, 'unauthorized');
  assert.equal(fixed.client.state, 'closed');

  let n = 0;
  const { client, ws, clock } = await connected({ token: async () => `tok-${++n}` });
  assert.equal(ws.url.searchParams.get('token'), 'tok-1');
  ws.serverClose(4502, 'unauthorized');
  assert.equal(client.state, 'disconnected');
  clock.advance(100);
  await tick();
  assert.equal(FakeWebSocket.last().url.searchParams.get('token'), 'tok-2');
});

test('retryable codes and transport failures reconnect', async () => {
  for (const code of [4000, 4001, 4002, 4003, 4004, 4005, 1001, 1006, 1011]) {
    const { client, ws } = await connected();
    ws.serverClose(code);
    assert.equal(client.state, 'disconnected', String(code));
  }
});

test('an undecodable frame closes the connection for good and reports it', async () => {
  const { client, ws, events } = await connected();
  ws.onmessage({ data: Uint8Array.from([2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).buffer });
  assert.equal(client.state, 'closed');
  assert.ok(ws.closed);
  const err = events.find(([t]) => t === 'error')[1];
  assert.equal(err.kind, 'UnsupportedVersion');
  const text = await connected();
  text.ws.onmessage({ data: 'hello' });
  assert.equal(text.client.state, 'closed');
});

test('an error frame with id 0 is reported as an event', async () => {
  const { ws, events } = await connected();
  ws.error(0n, 429, 'rate limited');
  const [, err] = events.find(([t]) => t === 'error');
  assert.ok(err instanceof RtError);
  assert.deepEqual([err.code, err.codeName, err.msgId], [429, 'rate_limited', 0n]);
});

test('close(): no reconnect, pending requests rejected, refresh sends the token raw', async () => {
  const { client, ws, clock } = await connected();
  const r = client.refresh('tok-new');
  await tick();
  const [f] = ws.sentOf(Kind.REFRESH);
  assert.deepEqual([f.codec, new TextDecoder().decode(f.body)], [Codec.RAW, 'tok-new']);
  client.close();
  await assert.rejects(r, (e) => e.codeName === 'closed');
  assert.deepEqual(ws.closed, { code: 1000, reason: '' });
  assert.equal(client.state, 'closed');
  clock.advance(60000);
  await tick();
  assert.equal(FakeWebSocket.instances.length, 1);
  await assert.rejects(client.connect(), (e) => e.codeName === 'closed');
});

test('requests time out when nothing answers', async () => {
  const { client, clock } = await connected({ requestTimeoutMs: 2000 });
  const p = client.join('slow.room');
  await tick();
  clock.advance(2000);
  await assert.rejects(p, (e) => e.codeName === 'timeout');
});
