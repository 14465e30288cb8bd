// Recovery after a reconnect (docs/protocol.md sections 2.4, 7.8, 13.4): the position
// block of push frames, the positions the client keeps per stream, and what it sends and
// reports when it reconnects. Fake clock and fake WebSocket, as in client.test.js.

import test from 'node:test';
import assert from 'node:assert/strict';

import { Client } from '../client.js';
import { Codec, Kind, Flag, FrameError, decodeBody, decodeFrame, encodeBody, encodeFrame } from '../codec.js';
import { FakeClock, FakeWebSocket, hex, tick } from './fakes.js';

/** A push frame with a position block spliced in after the fixed header. */
function positionedPush(room, epoch, offset, body) {
  const plain = encodeFrame({ kind: Kind.PUSH, codec: Codec.JSON, route: 'msg', body: encodeBody(body, Codec.JSON) });
  const id = new TextEncoder().encode(room ?? '');
  const block = new Uint8Array(18 + id.length);
  const view = new DataView(block.buffer);
  view.setBigUint64(0, BigInt(epoch));
  view.setBigUint64(8, BigInt(offset));
  block[16] = room === null ? 1 : 2;
  block[17] = id.length;
  block.set(id, 18);
  const out = new Uint8Array(plain.length + block.length);
  out.set(plain.subarray(0, 12));
  out[2] |= Flag.POSITION;
  out.set(block, 12);
  out.set(plain.subarray(12), 12 + block.length);
  return out;
}

function deliverBytes(ws, bytes) {
  ws.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
}

test('the position block: the layout of protocol section 2.4, and refusals', () => {
  // The vector of section 14.2: a push, JSON, position (room chat.lobby, epoch 7, offset
  // 42), route "msg", body {}.
  const bytes = hex(`
    01 06 22 03 00 00 00 00 00 00 00 09
    00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 2a 02 0a
    63 68 61 74 2e 6c 6f 62 62 79
    6d 73 67 7b 7d`);
  const f = decodeFrame(bytes);
  assert.deepEqual(f.position, { room: 'chat.lobby', epoch: 7, offset: 42 });
  assert.equal(f.route, 'msg');
  assert.deepEqual(decodeBody(f.body, f.codec), {});
  const user = decodeFrame(positionedPush(null, 3, 1, { a: 1 }));
  assert.deepEqual(user.position, { room: null, epoch: 3, offset: 1 });
  assert.equal(decodeFrame(encodeFrame({ kind: Kind.PUSH })).position, null);
  // Truncated anywhere in the block, an unknown stream kind, a zero epoch: refused.
  for (let cut = 12; cut < 40; cut++) {
    assert.throws(() => decodeFrame(bytes.subarray(0, cut)), FrameError, `cut at ${cut}`);
  }
  const badKind = bytes.slice();
  badKind[28] = 9;
  assert.throws(() => decodeFrame(badKind), (e) => e instanceof FrameError && e.kind === 'InvalidPosition');
  const zeroEpoch = bytes.slice();
  zeroEpoch.fill(0, 12, 20);
  assert.throws(() => decodeFrame(zeroEpoch), FrameError);
  // Bits 6 and 7 stay reserved.
  const reserved = encodeFrame({ kind: Kind.ACK });
  reserved[2] = 0x40;
  assert.throws(() => decodeFrame(reserved), FrameError);
});

function setup(options = {}) {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const client = new Client({
    url: 'ws://gw.test/ws',
    token: 'tok-1',
    WebSocket: FakeWebSocket,
    clock,
    random: () => 0.5,
    ...options,
  });
  const events = [];
  for (const type of ['recovered', 'push', 'error']) {
    client.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  return { client, clock, events };
}

test('without recovery: no positions asked, joins carry no body', async () => {
  const { client } = setup();
  const first = client.connect();
  await tick();
  const ws = FakeWebSocket.last();
  assert.equal(ws.url.searchParams.get('since'), null);
  assert.equal(ws.url.searchParams.get('positions'), null);
  ws.open();
  ws.welcome();
  await first;
  const j = client.join('chat.lobby');
  await tick();
  const [join] = ws.sentOf(Kind.JOIN);
  assert.equal(join.body.length, 0);
  ws.ack(join.msgId);
  assert.equal(await j, undefined);
});

test('recovery: positions kept per stream, sent on reconnect, answers reported', async () => {
  const { client, clock, events } = setup({ recovery: true });
  const first = client.connect();
  await tick();
  let ws = FakeWebSocket.last();
  // Nothing known yet: 0:0 asks for positions and for the user stream's current one.
  assert.equal(ws.url.searchParams.get('since'), '0:0');
  ws.open();
  ws.welcome({ recovery: { recovered: false, epoch: 9, offset: 3 } });
  await first;
  // A first connect learns the position but has nothing to report.
  assert.deepEqual(events, []);
  assert.deepEqual(client.positions.get(''), { epoch: 9, offset: 3 });

  // A first join names epoch 0 and learns the room's position from the ack.
  const j = client.join('chat.lobby');
  await tick();
  const [join] = ws.sentOf(Kind.JOIN);
  assert.deepEqual(decodeBody(join.body, join.codec), { epoch: 0, offset: 0 });
  ws.deliver({
    kind: Kind.ACK,
    msgId: join.msgId,
    codec: Codec.MSGPACK,
    body: encodeBody({ recovered: false, epoch: 5, offset: 10 }, Codec.MSGPACK),
  });
  assert.deepEqual(await j, { room: 'chat.lobby', recovered: false, epoch: 5, offset: 10 });
  assert.deepEqual(events, []);

  // Pushes move the positions, and carry theirs to the application.
  deliverBytes(ws, positionedPush('chat.lobby', 5, 11, { n: 11 }));
  deliverBytes(ws, positionedPush(null, 9, 4, { n: 4 }));
  await tick();
  await tick();
  assert.deepEqual(
    events.map(([, p]) => p.position),
    [
      { room: 'chat.lobby', epoch: 5, offset: 11 },
      { room: null, epoch: 9, offset: 4 },
    ],
  );
  assert.deepEqual(client.positions.get('chat.lobby'), { epoch: 5, offset: 11 });
  events.length = 0;

  // Disconnected: the next connection names the user stream's position, the rejoin the
  // room's, and each answer is reported once.
  ws.serverClose(4000, 'bye');
  clock.advance(200);
  await tick();
  ws = FakeWebSocket.last();
  assert.equal(ws.url.searchParams.get('since'), '9:4');
  ws.open();
  ws.welcome({ recovery: { recovered: true, epoch: 9, offset: 6 } });
  await tick();
  const [rejoin] = ws.sentOf(Kind.JOIN);
  assert.equal(rejoin.route, 'chat.lobby');
  assert.deepEqual(decodeBody(rejoin.body, rejoin.codec), { epoch: 5, offset: 11 });
  ws.deliver({
    kind: Kind.ACK,
    msgId: rejoin.msgId,
    codec: Codec.JSON,
    body: encodeBody({ recovered: false, epoch: 8, offset: 2 }, Codec.JSON),
  });
  await tick();
  assert.deepEqual(events, [
    ['recovered', { room: null, recovered: true, epoch: 9, offset: 6 }],
    ['recovered', { room: 'chat.lobby', recovered: false, epoch: 8, offset: 2 }],
  ]);
  // Not recovered: the position restarts from the stream's current one.
  assert.deepEqual(client.positions.get('chat.lobby'), { epoch: 8, offset: 2 });
  assert.deepEqual(client.positions.get(''), { epoch: 9, offset: 6 });
});
