// The library under Node against a real gateway. Skipped unless RT_GATEWAY_URL and
// RT_TOKEN are set: services/ws-api/tests/js_client.rs starts a nats-server, a gateway and
// ws-api, then runs this file with `node --experimental-websocket` (Node 20 has a WebSocket
// global only behind that flag; Node 22 has it by default).

import test from 'node:test';
import assert from 'node:assert/strict';

import { Client } from '../index.js';

const url = process.env.RT_GATEWAY_URL;
const token = process.env.RT_TOKEN;
const skip = !url || !token ? 'RT_GATEWAY_URL and RT_TOKEN not set (run by js_client.rs)' : typeof WebSocket !== 'function' ? 'no WebSocket global (Node 20 needs --experimental-websocket)' : false;

test('node: connect, publish with ack in both codecs, join a room', { skip, timeout: 30000 }, async () => {
  for (const codec of ['msgpack', 'json']) {
    const client = new Client({ url, token, codec });
    const welcome = await client.connect();
    assert.match(welcome.socketId, /^[0-9]+$/);
    assert.ok(welcome.heartbeat.baseMs > 0);
    await client.publish('node.hello', { codec });
    await client.publish('node.zipped', { text: 'z'.repeat(4000) }, { compress: true });
    await client.join('public.node');
    await assert.rejects(client.join('private.room'), (e) => e.code === 403);
    const closed = new Promise((resolve) => client.addEventListener('closed', resolve, { once: true }));
    client.close();
    await closed;
  }
});
