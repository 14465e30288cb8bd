// MessagePack round trips, the smallest-form integer rule of protocol 6.1, and malformed input.

import test from 'node:test';
import assert from 'node:assert/strict';

import { decode, encode, MsgpackError } from '../msgpack.js';
import { hex, toHex } from './fakes.js';

test('round trips every type', () => {
  const values = [
    null, true, false, 0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
    -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER,
    2n ** 64n - 1n, 2n ** 53n, -(2n ** 63n), 1.5, -0.25, 1e300, Infinity,
    '', 'a', 'x'.repeat(31), 'x'.repeat(32), 'x'.repeat(255), 'x'.repeat(256), 'y'.repeat(70000), 'héllo ✓ 😀',
    new Uint8Array(0), Uint8Array.from([0, 1, 255]), new Uint8Array(300), new Uint8Array(70000),
    [], [1, [2, [3]]], new Array(15).fill(7), new Array(16).fill('a'), new Array(70000).fill(0),
    {}, { a: 1, b: { c: [null, 'd'] } }, Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, i])),
  ];
  for (const v of values) {
    assert.deepEqual(decode(encode(v)), v, `value ${typeof v === 'string' ? v.slice(0, 20) : String(v).slice(0, 40)}`);
  }
  assert.ok(Number.isNaN(decode(encode(NaN))));
});

test('integers use the smallest unsigned form that fits (protocol 6.1)', () => {
  const cases = [
    [0, '00'], [127, '7f'], [128, 'cc 80'], [255, 'cc ff'], [256, 'cd 01 00'], [65536, 'ce 00 01 00 00'],
    [2 ** 32, 'cf 00 00 00 01 00 00 00 00'], [-1, 'ff'], [-32, 'e0'], [-33, 'd0 df'], [-129, 'd1 ff 7f'],
    [2n ** 64n - 1n, 'cf ff ff ff ff ff ff ff ff'], [5n, '05'],
  ];
  for (const [v, want] of cases) assert.equal(toHex(encode(v)), want, String(v));
});

test('u64 values above 2^53 decode as BigInt, smaller ones as numbers, any width accepted', () => {
  assert.equal(decode(hex('cf 01 e8 60 6a 00 00 10 00')), 137465797017604096n);
  assert.equal(decode(hex('cf 00 00 00 00 00 00 00 05')), 5);
  assert.equal(decode(hex('d3 ff ff ff ff ff ff ff fe')), -2);
  assert.equal(decode(hex('ca 3f c0 00 00')), 1.5);
  assert.deepEqual(decode(hex('d4 01 07')), { type: 1, data: Uint8Array.from([7]) });
});

test('maps: keys become strings, __proto__ stays data', () => {
  const m = decode(hex('82 01 a1 61 a9 5f 5f 70 72 6f 74 6f 5f 5f 80'));
  assert.equal(m['1'], 'a');
  assert.equal(Object.getPrototypeOf(m), Object.prototype);
  assert.ok(Object.hasOwn(m, '__proto__'));
  assert.equal(toHex(encode(new Map([[1, 'a']]))), '81 01 a1 61');
  // undefined members are left out, like JSON.
  assert.deepEqual(decode(encode({ a: undefined, b: 1 })), { b: 1 });
});

test('malformed input is refused with MsgpackError', () => {
  for (const bad of ['c1', 'cd 01', 'a3 61 62', '92 01', 'c4 05 00', '01 02', 'a2 c3 28']) {
    assert.throws(() => decode(hex(bad)), MsgpackError, bad);
  }
  assert.throws(() => encode(2n ** 64n), MsgpackError);
  assert.throws(() => encode(() => 1), MsgpackError);
  const deep = [];
  let cur = deep;
  for (let i = 0; i < 600; i++) {
    const next = [];
    cur.push(next);
    cur = next;
  }
  assert.throws(() => encode(deep), MsgpackError);
  assert.throws(() => decode(new Uint8Array(600).fill(0x91)), MsgpackError);
});
