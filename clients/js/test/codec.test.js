// Frame codec against the test vectors of docs/protocol.md appendix 14.2 (every one of
// them) and the body examples of sections 6 and 12.7.

import test from 'node:test';
import assert from 'node:assert/strict';

import {
  Codec,
  Kind,
  FrameError,
  closeAction,
  decodeBody,
  decodeFrame,
  deflateRaw,
  encodeBody,
  encodeFrame,
  formatTraceparent,
  inflateRaw,
  isValidRoomId,
  isValidRoute,
  parseTraceparent,
  readError,
  readHeartbeatAck,
  readReconnect,
  readWelcome,
} from '../codec.js';
import * as msgpack from '../msgpack.js';
import { hex, toHex } from './fakes.js';

const PUBLISH_JSON = hex('01 05 02 03 01 02 03 04 05 06 07 08 61 2e 62 7b 7d');

const PUBLISH_TRACE = hex(`
01 05 09 09 00 00 00 00 00 00 00 2a 4b f9 2f 35 77 b3 4d a6 a3 ce 92 9d 0e 0e 47 36
00 f0 67 aa 0b a9 02 b7 01 63 68 61 74 2e 73 65 6e 64 81 a1 61 01`);

const HEARTBEAT_ACK = hex(`
01 04 01 00 00 00 00 00 00 00 00 00 81 b0 6e 65 78 74 5f 69 6e 74 65 72 76 61 6c 5f
6d 73 cd 3a 98`);

const WELCOME_BODY = hex(`
86 a9 73 6f 63 6b 65 74 5f 69 64 cf 01 e8 60 6a 00 00 10 00 a7 75 73 65 72 5f 69 64
a5 61 6c 69 63 65 a7 67 61 74 65 77 61 79 a4 67 77 2d 31 a9 68 65 61 72 74 62 65 61
74 85 a7 62 61 73 65 5f 6d 73 cd 27 10 a7 73 74 65 70 5f 6d 73 cd 13 88 a6 6d 61 78
5f 6d 73 cd ea 60 aa 67 72 6f 77 5f 61 66 74 65 72 03 a8 67 72 61 63 65 5f 6d 73 cd
13 88 ae 6d 61 78 5f 62 6f 64 79 5f 62 79 74 65 73 ce 00 01 00 00 ae 73 65 72 76 65
72 5f 74 69 6d 65 5f 6d 73 cf 00 00 01 a3 18 5c 50 00`);

const SIGNED_COMMAND = hex(`
83 a3 6b 69 64 b0 32 31 66 65 33 31 64 66 61 31 35 34 61 32 36 31 a8 65 6e 76 65 6c
6f 70 65 c4 80 87 a1 76 01 a2 69 64 d9 20 30 30 30 31 30 32 30 33 30 34 30 35 30 36
30 37 30 38 30 39 30 61 30 62 30 63 30 64 30 65 30 66 a4 6e 6f 64 65 a6 65 64 67 65
2d 31 a5 72 6f 75 74 65 ac 61 67 65 6e 74 2e 63 61 6e 63 65 6c a9 69 73 73 75 65 64
5f 6d 73 cf 00 00 01 a3 18 5c 50 00 aa 65 78 70 69 72 65 73 5f 6d 73 cf 00 00 01 a3
18 65 77 c0 a4 62 6f 64 79 c4 0a 81 a7 74 61 73 6b 5f 69 64 2a a3 73 69 67 c4 40 7e
25 d6 36 fa 79 cf 44 81 61 4f 78 ff 79 e4 be 82 86 d7 f9 2f 84 9a 2c ac 42 9f b8 e7
33 d5 35 5a ac c6 2b 0b 2a eb d3 cd 01 2c e6 c0 a0 38 0e 16 ee 37 26 43 23 3b cc df
99 d0 ef 7d d1 27 09`);

const ACK = hex('01 07 00 00 00 00 00 00 00 00 00 00');

test('2.1 publish, JSON body: encodes to the vector and decodes back', () => {
  const frame = { kind: Kind.PUBLISH, codec: Codec.JSON, msgId: 0x0102030405060708n, route: 'a.b', body: encodeBody({}, Codec.JSON) };
  assert.equal(toHex(encodeFrame(frame)), toHex(PUBLISH_JSON));
  assert.equal(PUBLISH_JSON.length, 17);
  const d = decodeFrame(PUBLISH_JSON);
  assert.deepEqual(
    { kind: d.kind, codec: d.codec, compressed: d.compressed, receipt: d.receipt, msgId: d.msgId, trace: d.trace, route: d.route },
    { kind: 5, codec: 2, compressed: false, receipt: false, msgId: 72623859790382856n, trace: null, route: 'a.b' },
  );
  assert.deepEqual(decodeBody(d.body, d.codec), {});
});

test('2.2 publish with trace context, MessagePack body: encodes to the vector and decodes back', () => {
  const trace = parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
  assert.ok(trace);
  const frame = { kind: Kind.PUBLISH, codec: Codec.MSGPACK, msgId: 42, trace, route: 'chat.send', body: msgpack.encode({ a: 1 }) };
  assert.equal(toHex(encodeFrame(frame)), toHex(PUBLISH_TRACE));
  assert.equal(PUBLISH_TRACE.length, 50);
  const d = decodeFrame(PUBLISH_TRACE);
  assert.equal(d.msgId, 42n);
  assert.equal(d.route, 'chat.send');
  assert.ok(d.trace);
  assert.equal(formatTraceparent(d.trace), '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
  assert.deepEqual(decodeBody(d.body, d.codec), { a: 1 });
});

test('14.2 heartbeat ack: encodes to the vector and reads next_interval_ms', () => {
  const frame = { kind: Kind.HEARTBEAT_ACK, codec: Codec.MSGPACK, body: msgpack.encode({ next_interval_ms: 15000 }) };
  assert.equal(toHex(encodeFrame(frame)), toHex(HEARTBEAT_ACK));
  assert.equal(HEARTBEAT_ACK.length, 33);
  const d = decodeFrame(HEARTBEAT_ACK);
  assert.equal(readHeartbeatAck(decodeBody(d.body, d.codec)), 15000);
});

test('6.2/14.2 welcome body: reads the fields and re-encodes byte for byte', () => {
  assert.equal(WELCOME_BODY.length, 158);
  const raw = msgpack.decode(WELCOME_BODY);
  // The socket id is above 2^53: it must come back exact, never as a float.
  assert.equal(typeof raw.socket_id, 'bigint');
  assert.equal(toHex(msgpack.encode(raw)), toHex(WELCOME_BODY));
  assert.deepEqual(readWelcome(raw), {
    socketId: '137465797017604096',
    userId: 'alice',
    gateway: 'gw-1',
    heartbeat: { baseMs: 10000, stepMs: 5000, maxMs: 60000, growAfter: 3, graceMs: 5000 },
    maxBodyBytes: 65536,
    serverTimeMs: 1800000000000,
    recovery: null,
  });
  // The JSON form of section 6.2 carries the socket id as a string.
  const json = `{"socket_id":"137465797017604096","user_id":"alice","gateway":"gw-1","heartbeat":{"base_ms":10000,"step_ms":5000,"max_ms":60000,"grow_after":3,"grace_ms":5000},"max_body_bytes":65536,"server_time_ms":1800000000000,"future_key":true}`;
  assert.deepEqual(readWelcome(decodeBody(new TextEncoder().encode(json), Codec.JSON)), readWelcome(raw));
});

test('12.8/14.2 signed command body: decodes and re-encodes byte for byte', () => {
  assert.equal(SIGNED_COMMAND.length, 231);
  const cmd = msgpack.decode(SIGNED_COMMAND);
  assert.equal(cmd.kid, '21fe31dfa154a261');
  assert.ok(cmd.envelope instanceof Uint8Array);
  assert.equal(cmd.sig.length, 64);
  assert.equal(toHex(cmd.sig.subarray(60)), toHex(SIGNED_COMMAND.subarray(227)));
  const envelope = msgpack.decode(cmd.envelope);
  assert.deepEqual({ ...envelope, body: msgpack.decode(envelope.body) }, {
    v: 1,
    id: '000102030405060708090a0b0c0d0e0f',
    node: 'edge-1',
    route: 'agent.cancel',
    issued_ms: 1800000000000,
    expires_ms: 1800000600000,
    body: { task_id: 42 },
  });
  assert.equal(toHex(msgpack.encode(cmd)), toHex(SIGNED_COMMAND));
});

test('6.4, 6.5, 6.6, 12.7 body examples in MessagePack', () => {
  const err = hex('82 a4 63 6f 64 65 cd 01 9d a7 6d 65 73 73 61 67 65 a9 74 6f 6f 20 6c 61 72 67 65');
  assert.deepEqual(readError(msgpack.decode(err)), { code: 413, message: 'too large' });
  assert.equal(toHex(msgpack.encode({ code: 413, message: 'too large' })), toHex(err));
  const rc = hex('82 a8 64 65 6c 61 79 5f 6d 73 cc fa a6 72 65 61 73 6f 6e a5 64 72 61 69 6e');
  assert.deepEqual(readReconnect(msgpack.decode(rc)), { delayMs: 250, reason: 'drain' });
  assert.equal(toHex(msgpack.encode({ delay_ms: 250, reason: 'drain' })), toHex(rc));
  assert.equal(toHex(msgpack.encode({})), '80');
  assert.equal(toHex(msgpack.encode({ op: 'resync' })), '81 a2 6f 70 a6 72 65 73 79 6e 63');
  assert.equal(toHex(msgpack.encode({ next_interval_ms: 15000 })), toHex(HEARTBEAT_ACK.subarray(12)));
});

/** @param {Uint8Array} bytes @param {string} kind @param {object} [details] */
function refused(bytes, kind, details) {
  assert.throws(
    () => decodeFrame(bytes),
    (e) => {
      assert.ok(e instanceof FrameError, String(e));
      assert.equal(e.kind, kind);
      if (details) assert.deepEqual(e.details, details);
      return true;
    },
  );
}

/** @param {number} at @param {number} value @param {number[]} [extra] */
function ackWith(at, value, extra = []) {
  const b = Uint8Array.from([...ACK, ...extra]);
  b[at] = value;
  return b;
}

test('14.2 frames the decoder must refuse', () => {
  assert.equal(decodeFrame(ACK).kind, Kind.ACK);
  refused(ackWith(0, 0x02), 'UnsupportedVersion');
  refused(ackWith(0, 0x00), 'UnsupportedVersion');
  refused(ackWith(1, 0x00), 'UnknownKind');
  refused(ackWith(1, 0xc8), 'UnknownKind');
  refused(ackWith(2, 0x40), 'ReservedFlags');
  // 0x10 is the receipt bit and decodes; 0x20 announces a position block (2.4).
  assert.equal(decodeFrame(ackWith(2, 0x10)).receipt, true);
  refused(ackWith(2, 0x03), 'UnknownCodec');
  refused(ackWith(2, 0x08, new Array(25).fill(0)), 'InvalidTraceContext');
  refused(ackWith(3, 0x03, [0x61, 0x2a, 0x62]), 'InvalidRoute', { reason: { BadByte: { byte: 0x2a, at: 1 } } });
  refused(ACK.subarray(0, 11), 'Truncated', { needed: 12, got: 11 });
});

test('section 8: order of checks and the remaining decoder errors', () => {
  // Reserved bit and codec 3 together report ReservedFlags (section 3).
  refused(ackWith(2, 0x43), 'ReservedFlags');
  // Route length over the limit is checked before anything after the header.
  assert.throws(() => decodeFrame(ackWith(3, 200), { maxRoute: 128 }), (e) => e.kind === 'RouteTooLong');
  refused(ackWith(3, 4, [0x61]), 'Truncated', { needed: 16, got: 13 });
  refused(ackWith(2, 0x08, [1, 2, 3]), 'Truncated', { needed: 37, got: 15 });
  refused(ackWith(3, 2, [0x61, 0x2e]), 'InvalidRoute', { reason: 'EmptyToken' });
  assert.throws(() => decodeFrame(Uint8Array.from([...ACK, 1, 2, 3]), { maxBody: 2 }), (e) => e.kind === 'BodyTooLarge');
  // The encoder refuses what the gateway would close the session for.
  assert.throws(() => encodeFrame({ kind: Kind.PUBLISH, route: 'a..b' }), FrameError);
  assert.throws(() => encodeFrame({ kind: 13 }), FrameError);
  assert.throws(() => encodeFrame({ kind: Kind.ACK, codec: 3 }), FrameError);
});

test('5.2 and 5.3 routes and room ids', () => {
  for (const ok of ['chat.send', 'agent.v1.result', 'orders.new', 'user:42@tenant', '']) assert.ok(isValidRoute(ok), ok);
  for (const bad of ['.a', 'a.', 'a..b', 'a b', 'a*b', 'a>', 'a/b', 'é']) assert.ok(!isValidRoute(bad), bad);
  assert.ok(isValidRoomId('chat.lobby'));
  assert.ok(!isValidRoomId(''));
  assert.ok(isValidRoomId('r'.repeat(128)));
  assert.ok(!isValidRoomId('r'.repeat(129)));
});

test('10.2 traceparent parsing', () => {
  assert.equal(parseTraceparent('00-00000000000000000000000000000000-00f067aa0ba902b7-01'), null);
  assert.equal(parseTraceparent('00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01'), null);
  assert.equal(parseTraceparent('ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'), null);
  assert.ok(parseTraceparent(' 01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra '));
  assert.equal(parseTraceparent('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra'), null);
});

test('9.1 and 13.1 close codes: reconnect, new token, or stop', () => {
  for (const code of [1000, 1001, 1006, 1011, 3000, 3999, 4000, 4001, 4002, 4003, 4004, 4005, 4100, 4499]) {
    assert.equal(closeAction(code), 'reconnect', String(code));
  }
  assert.equal(closeAction(4502), 'new_token');
  for (const code of [4500, 4501, 4503, 4504, 4505, 4600, 4999, 5000, 999]) assert.equal(closeAction(code), 'stop', String(code));
});

test('3 compression: raw DEFLATE round trip and the inflate bound', async () => {
  const text = new TextEncoder().encode(JSON.stringify({ hello: 'x'.repeat(1000) }));
  const packed = await deflateRaw(text);
  assert.ok(packed.length < text.length / 5);
  // No zlib header: a zlib stream starts 0x78.
  assert.notEqual(packed[0], 0x78);
  assert.deepEqual(await inflateRaw(packed), text);
  await assert.rejects(inflateRaw(packed, 100), RangeError);
  await assert.rejects(inflateRaw(Uint8Array.from([0xff, 0xff, 0xff])));
});

test('bodies are decoded by their own codec bits', () => {
  assert.deepEqual(decodeBody(Uint8Array.from([1, 2]), Codec.RAW), Uint8Array.from([1, 2]));
  assert.equal(decodeBody(new Uint8Array(0), Codec.JSON), undefined);
  assert.deepEqual(decodeBody(encodeBody({ big: 2n ** 63n }, Codec.JSON), Codec.JSON), { big: '9223372036854775808' });
  assert.deepEqual(encodeBody('hi', Codec.RAW), Uint8Array.from([0x68, 0x69]));
  assert.throws(() => encodeBody({}, Codec.RAW), TypeError);
});

test('3 compression without a deflate-raw stream (older Node): node:zlib, same bound', async () => {
  const text = new TextEncoder().encode('y'.repeat(3000));
  const streams = [globalThis.CompressionStream, globalThis.DecompressionStream];
  const packedByStream = await deflateRaw(text);
  // What Node 18 does with the format it does not know.
  class NoDeflateRaw {
    constructor(format) {
      throw new TypeError(`unsupported format ${format}`);
    }
  }
  globalThis.CompressionStream = NoDeflateRaw;
  globalThis.DecompressionStream = NoDeflateRaw;
  try {
    const packed = await deflateRaw(text);
    assert.deepEqual(await inflateRaw(packed), text);
    assert.deepEqual(await inflateRaw(packedByStream), text);
    await assert.rejects(inflateRaw(packed, 100), RangeError);
  } finally {
    [globalThis.CompressionStream, globalThis.DecompressionStream] = streams;
  }
});
