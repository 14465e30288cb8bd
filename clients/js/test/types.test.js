// index.d.ts is hand-written: every runtime export must be declared there and every
// declared export must exist, so the two cannot drift apart unnoticed.

import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import * as lib from '../index.js';

test('index.d.ts declares exactly the exports of index.js', () => {
  const dts = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8');
  const declared = new Set(
    [...dts.matchAll(/^export (?:const|function|class|namespace) ([A-Za-z_$][\w$]*)/gm)].map((m) => m[1]),
  );
  assert.deepEqual([...declared].sort(), Object.keys(lib).sort());
});
