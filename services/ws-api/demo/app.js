// The demo page: a chat room with presence, on the rt-js client library served beside it
// (./lib/, the files of clients/js). Query parameters for scripted use: `user` connects at
// once, `gw` overrides the gateway URL, `transports` (comma-separated, default
// `websocket,longpoll`), `upgradeDelayMs`.
//
// State for tests and curious people is in `window.demo`.

import { Client } from './lib/index.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const demo = {
  client: null,
  state: 'idle',
  transport: null,
  joined: false,
  acks: 0,
  pushes: [],
  messages: [],
  online: new Map(),
  errors: [],
};
window.demo = demo;

const config = await fetch('./config.json').then((r) => r.json());
$('room').textContent = config.room;
if (!config.devTokens) $('token').placeholder = 'token (required)';
else $('token').hidden = true;

function line(text, cls) {
  const li = document.createElement('li');
  li.textContent = text;
  if (cls) li.className = cls;
  $('messages').append(li);
  li.scrollIntoView({ block: 'end' });
}

function showStatus() {
  demo.transport = demo.client?.transport ?? null;
  $('status').textContent = `${demo.state}${demo.transport ? ` (${demo.transport})` : ''}`;
}
setInterval(showStatus, 250);

function showOnline() {
  const now = Date.now();
  $('online').replaceChildren(
    ...[...demo.online]
      .filter(([, seen]) => now - seen < 30000)
      .map(([user]) => Object.assign(document.createElement('li'), { textContent: user })),
  );
}
setInterval(showOnline, 1000);

async function tokenFor(user) {
  const pasted = $('token').value.trim();
  if (pasted) return pasted;
  const r = await fetch('./token', { method: 'POST', body: JSON.stringify({ user }) });
  const body = await r.json();
  if (!r.ok) throw new Error(`${body.error}: ${body.detail}`);
  return body.token;
}

async function connect(user) {
  const gatewayUrl = params.get('gw') || config.gatewayUrl || prompt('Gateway URL (ws://host:port/ws)');
  const client = new Client({
    url: gatewayUrl,
    token: () => tokenFor(user),
    codec: 'json',
    transports: (params.get('transports') || 'websocket,longpoll').split(','),
    upgradeDelayMs: Number(params.get('upgradeDelayMs') || 2000),
    wsTimeoutMs: Number(params.get('wsTimeoutMs') || 10000),
  });
  demo.client = client;
  for (const type of ['connecting', 'connected', 'disconnected', 'closed']) {
    client.addEventListener(type, (e) => {
      demo.state = type;
      showStatus();
      if (type !== 'connecting') line(`${type}${e.detail?.code ? ` (${e.detail.code} ${e.detail.reason})` : ''}`, 'sys');
    });
  }
  client.addEventListener('error', (e) => demo.errors.push(String(e.detail?.message ?? e.detail)));
  client.addEventListener('push', (e) => {
    const p = e.detail;
    demo.pushes.push({ route: p.route, body: p.body });
    if (p.route === 'demo.said') {
      demo.messages.push(p.body);
      demo.online.set(p.body.user, Date.now());
      line(`${p.body.user}: ${p.body.text}`, p.body.user === user ? 'me' : '');
    } else if (p.route === 'demo.here') {
      demo.online.set(p.body.user, Date.now());
    } else {
      line(`push ${p.route}: ${JSON.stringify(p.body)}`, 'sys');
    }
    showOnline();
  });
  client.addEventListener('connected', () => {
    client.join(config.room).then(
      () => {
        demo.joined = true;
        client.publish('demo.here', {}).catch(() => {});
      },
      (e) => line(`join refused: ${e.message}`, 'sys'),
    );
  });
  await client.connect();
  $('text').disabled = $('send').disabled = false;
  setInterval(() => {
    if (client.state === 'connected') client.publish('demo.here', {}).catch(() => {});
  }, 10000);
}

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  $('login').hidden = true;
  connect($('user').value.trim()).catch((err) => line(`cannot connect: ${err.message}`, 'sys'));
});

$('say').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('text').value;
  if (!text || !demo.client) return;
  $('text').value = '';
  demo.client.publish('demo.say', { text }).then(
    () => demo.acks++,
    (err) => line(`not sent: ${err.message}`, 'sys'),
  );
});

if (params.get('user')) {
  $('user').value = params.get('user');
  $('login').hidden = true;
  connect(params.get('user')).catch((err) => line(`cannot connect: ${err.message}`, 'sys'));
}
demo.ready = true;
