// The operator console's only script: live updates over Server-Sent Events.
// Served from /console/assets/console.js (the CSP allows no inline script). Every value
// from the server is written with textContent, never as HTML.
(function () {
  'use strict';

  function attrSelector(name, value) {
    return '[' + name + '="' + (window.CSS && CSS.escape ? CSS.escape(value) : value) + '"]';
  }

  // A task's page: output as it streams, target states as results arrive.
  var output = document.querySelector('[data-task-events]');
  if (output) {
    var streamState = document.getElementById('stream-state');
    var say = function (text) { if (streamState) { streamState.textContent = text; } };
    var preFor = function (node) {
      var pre = output.querySelector('pre' + attrSelector('data-node', node));
      if (!pre) {
        var h = document.createElement('h3');
        h.textContent = node;
        pre = document.createElement('pre');
        pre.setAttribute('data-node', node);
        output.appendChild(h);
        output.appendChild(pre);
      }
      return pre;
    };
    var streamed = {};
    var es = new EventSource(output.getAttribute('data-task-events'));
    es.onopen = function () { say('live'); };
    es.addEventListener('output', function (e) {
      var d = JSON.parse(e.data);
      var pre = preFor(d.node);
      if (!streamed[d.node]) { pre.textContent = ''; streamed[d.node] = true; }
      pre.textContent += d.data;
    });
    es.addEventListener('gap', function (e) {
      var d = JSON.parse(e.data);
      preFor(d.node).textContent += '\n[chunks ' + d.from_seq + '-' + d.to_seq + ' missing]\n';
    });
    es.addEventListener('result', function (e) {
      var d = JSON.parse(e.data);
      var cell = document.querySelector(attrSelector('data-state-of', d.node));
      if (cell) {
        cell.textContent = '';
        var b = document.createElement('span');
        b.className = 'badge s-' + d.state;
        b.textContent = d.state;
        cell.appendChild(b);
      }
      var exit = document.querySelector(attrSelector('data-exit-of', d.node));
      if (exit) { exit.textContent = d.exit_code === null || d.exit_code === undefined ? (d.error || '') : String(d.exit_code); }
      if (!streamed[d.node] && (d.stdout_tail || d.stderr_tail)) {
        preFor(d.node).textContent = (d.stdout_tail || '') + (d.stderr_tail || '');
      }
    });
    es.addEventListener('end', function () {
      es.close();
      say('finished');
      document.body.setAttribute('data-task-ended', '1');
      var cancel = document.getElementById('cancel');
      if (cancel) { cancel.remove(); }
    });
    es.onerror = function () { if (es.readyState === EventSource.CLOSED) { say('disconnected'); } else { say('reconnecting…'); } };
  }

  // The fleet page's counts.
  var fleet = document.querySelector('[data-live="fleet"]');
  if (fleet) {
    var fs = new EventSource('/console/live/fleet');
    fs.addEventListener('fleet', function (e) {
      var d = JSON.parse(e.data);
      Object.keys(d).forEach(function (k) {
        var el = fleet.querySelector(attrSelector('data-count', k));
        if (el) { el.textContent = String(d[k]); }
      });
    });
  }

  // The gateway tier's table.
  var gateways = document.querySelector('[data-live="gateways"]');
  if (gateways) {
    var body = gateways.querySelector('tbody');
    var cell = function (text, cls) {
      var td = document.createElement('td');
      if (cls) { td.className = cls; }
      td.textContent = text === null || text === undefined ? '–' : String(text);
      return td;
    };
    var gs = new EventSource('/console/live/gateways');
    gs.addEventListener('gateways', function (e) {
      var rows = JSON.parse(e.data);
      var fresh = document.createDocumentFragment();
      rows.forEach(function (r) {
        var tr = document.createElement('tr');
        tr.setAttribute('data-gateway', r.instance);
        tr.appendChild(cell(r.instance));
        var ready = document.createElement('td');
        var badge = document.createElement('span');
        badge.className = 'badge s-' + (r.ready ? 'ready' : 'not_ready');
        badge.textContent = r.ready ? 'ready' : 'not ready';
        ready.appendChild(badge);
        tr.appendChild(ready);
        tr.appendChild(cell(r.worker_id));
        var app = cell(r.app_connections, 'num'); app.setAttribute('data-field', 'app_connections'); tr.appendChild(app);
        var agent = cell(r.agent_connections, 'num'); agent.setAttribute('data-field', 'agent_connections'); tr.appendChild(agent);
        tr.appendChild(cell(r.slow_consumer_closes, 'num'));
        tr.appendChild(cell(r.push_rate, 'num'));
        tr.appendChild(cell(r.publish_rate, 'num'));
        tr.appendChild(cell(r.age_s + 's ago'));
        fresh.appendChild(tr);
      });
      if (!rows.length) {
        var tr = document.createElement('tr');
        var td = cell('No gateway heard from yet.');
        td.setAttribute('colspan', '9');
        tr.appendChild(td);
        fresh.appendChild(tr);
      }
      body.textContent = '';
      body.appendChild(fresh);
    });
  }

  // The new-task form: show only the inputs the chosen kind and targeting use.
  var form = document.getElementById('new-task');
  if (form) {
    var sync = function () {
      var kind = form.querySelector('input[name="kind"]:checked');
      var by = form.querySelector('input[name="targets_by"]:checked');
      var isCommand = !kind || kind.value === 'command';
      form.querySelector('#argv').hidden = !isCommand;
      form.querySelector('label[for="argv"]').hidden = !isCommand;
      form.querySelector('#target').hidden = isCommand;
      form.querySelector('label[for="target"]').hidden = isCommand;
      var bySelector = !by || by.value === 'selector';
      form.querySelector('#selector').hidden = !bySelector;
      form.querySelector('#nodes').hidden = bySelector;
    };
    form.addEventListener('change', sync);
    sync();
  }
}());
