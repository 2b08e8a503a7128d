// warden console: live updates, relative times and the quick filter.
//
// Every page is complete without this script. With it, the page listens to
// GET /v1/stream (EventSource; the session cookie authenticates it) and,
// when something changes, fetches itself again and swaps the regions marked
// data-live, so what is shown is always what the server renders. A status
// change also patches the agent's row and the totals at once, before the
// refetch lands.
(function () {
  'use strict';

  var body = document.body;
  var live = document.getElementById('live');
  var GLYPHS = { online: '\u25cf', degraded: '\u25b2', offline: '\u25a0', unknown: '\u25cb' };

  // ---- times: the same words as the server (format::span, format::ago)
  function span(secs) {
    secs = Math.max(0, Math.floor(secs));
    var d = Math.floor(secs / 86400), h = Math.floor((secs % 86400) / 3600);
    var m = Math.floor((secs % 3600) / 60), s = secs % 60;
    if (d === 0 && h === 0 && m === 0) return s + 's';
    if (d === 0 && h === 0) return (m < 10 && s > 0) ? m + 'm ' + s + 's' : m + 'm';
    if (d === 0) return m === 0 ? h + 'h' : h + 'h ' + m + 'm';
    return h === 0 ? d + 'd' : d + 'd ' + h + 'h';
  }
  function ago(secs) {
    if (secs < -60) return 'in ' + span(-secs);
    return secs < 2 ? 'just now' : span(secs) + ' ago';
  }
  function tickTimes() {
    var now = Date.now();
    document.querySelectorAll('time[data-rel]').forEach(function (el) {
      var t = Date.parse(el.getAttribute('datetime'));
      if (!isNaN(t)) el.textContent = ago((now - t) / 1000);
    });
  }
  setInterval(tickTimes, 10000);

  // ---- quick filter of the agent table (the form still filters server-side on Enter)
  var quick = document.querySelector('[data-quick-filter]');
  function applyQuickFilter() {
    if (!quick) return;
    var needle = quick.value.trim().toLowerCase();
    var shown = 0, total = 0;
    document.querySelectorAll('#agents-table tbody tr').forEach(function (tr) {
      // The same fields as the server's search (id, name, key=value labels),
      // so that typing and pressing Enter agree.
      var text = tr.hasAttribute('data-search') ? tr.getAttribute('data-search') : tr.textContent;
      var match = !needle || text.toLowerCase().indexOf(needle) !== -1;
      tr.hidden = !match;
      total++;
      if (match) shown++;
    });
    var count = document.getElementById('quick-count');
    if (count) count.textContent = needle && shown !== total ? ' \u00b7 ' + shown + ' on this page match \u201c' + quick.value.trim() + '\u201d' : '';
  }
  if (quick) quick.addEventListener('input', applyQuickFilter);

  // ---- live indicator
  function setLive(state, text) {
    if (!live) return;
    live.hidden = false;
    live.setAttribute('data-state', state);
    var label = live.querySelector('.live-text');
    if (label) label.textContent = text;
  }

  // ---- refetch and swap live regions
  // A busy fleet sends events all the time: a page is fetched again at
  // most every MIN_GAP ms (status dots are patched from the events in
  // between), and not at all while the tab is hidden (it catches up when
  // shown), so that open tabs do not keep the database rendering pages.
  var timer = null, busy = false, again = false, stopped = false, last = -Infinity, MIN_GAP = 2000;

  function schedule(delay) {
    if (timer || stopped || document.visibilityState === 'hidden') return;
    var wait = Math.max(delay === undefined ? 200 : delay, last + MIN_GAP - performance.now());
    timer = setTimeout(function () { timer = null; refresh(); }, wait);
  }

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    last = performance.now();
    fetch(window.location.href, { credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'text/html' } })
      .then(function (r) {
        if (r.redirected && new URL(r.url).pathname === '/login') {
          stop('Signed out \u2014 reload to sign in');
          throw new Error('signed out');
        }
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.text();
      })
      .then(function (text) { swap(new DOMParser().parseFromString(text, 'text/html')); })
      .catch(function () { /* the next event or tick tries again */ })
      .then(function () {
        busy = false;
        if (again) { again = false; schedule(50); }
      });
  }

  function swap(doc) {
    var active = document.activeElement;
    var activeId = active && active.id;
    var typing = active && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName);
    var openDetails = {};
    document.querySelectorAll('details[id]').forEach(function (d) { openDetails[d.id] = d.open; });
    document.querySelectorAll('[data-live]').forEach(function (el) {
      if (!el.id) return;
      var fresh = doc.getElementById(el.id);
      if (!fresh) return;
      // Never pull a field out from under someone typing in it.
      if (typing && el.contains(active)) return;
      if (fresh.innerHTML !== el.innerHTML) el.innerHTML = fresh.innerHTML;
    });
    Object.keys(openDetails).forEach(function (id) {
      var d = document.getElementById(id);
      if (d) d.open = openDetails[id];
    });
    if (activeId && document.activeElement !== active) {
      var target = document.getElementById(activeId);
      if (target) target.focus({ preventScroll: true });
    }
    var title = doc.querySelector('title');
    if (title) document.title = title.textContent;
    applyQuickFilter();
    tickTimes();
    markScrollable();
  }

  // ---- tables wider than their box: a tab stop to scroll them from the
  // keyboard, named after their caption, and a shadow at the hidden edge
  function markScrollable() {
    document.querySelectorAll('.table-wrap').forEach(function (wrap) {
      var scrolls = wrap.scrollWidth > wrap.clientWidth + 1;
      wrap.classList.toggle('scrolls', scrolls);
      if (scrolls) {
        var caption = wrap.querySelector('caption');
        wrap.setAttribute('tabindex', '0');
        wrap.setAttribute('role', 'region');
        wrap.setAttribute('aria-label', (caption ? caption.textContent : 'Table') + ' (scrolls sideways)');
      } else {
        wrap.removeAttribute('tabindex');
        wrap.removeAttribute('role');
        wrap.removeAttribute('aria-label');
      }
    });
  }
  window.addEventListener('resize', function () { markScrollable(); });

  // ---- immediate patches from a status_changed event
  function badge(liveness) {
    var b = document.createElement('span');
    b.className = 'badge lv-' + liveness;
    b.setAttribute('data-liveness', liveness);
    var g = document.createElement('span');
    g.className = 'glyph';
    g.setAttribute('aria-hidden', 'true');
    g.textContent = GLYPHS[liveness] || GLYPHS.unknown;
    b.appendChild(g);
    b.appendChild(document.createTextNode(liveness));
    return b;
  }

  function bump(which, delta) {
    var el = document.querySelector('[data-total="' + which + '"]');
    if (!el) return;
    var n = parseInt(el.textContent.replace(/[^0-9-]/g, ''), 10);
    if (!isNaN(n)) el.textContent = Math.max(0, n + delta).toLocaleString('en-US');
  }

  function patchStatus(d) {
    if (!d || typeof d.agent_id !== 'string' || typeof d.new !== 'string' || !GLYPHS[d.new]) return;
    var rows = document.querySelectorAll('tr[data-agent="' + CSS.escape(d.agent_id) + '"]');
    rows.forEach(function (tr) {
      if (tr.getAttribute('data-liveness') === d.new) return;
      tr.setAttribute('data-liveness', d.new);
      var cell = tr.querySelector('[data-field="liveness"]');
      if (cell) { cell.textContent = ''; cell.appendChild(badge(d.new)); }
      tr.classList.remove('changed');
      void tr.offsetWidth; // restart the highlight
      tr.classList.add('changed');
    });
    if (typeof d.old === 'string' && d.old !== d.new) {
      bump(d.old, -1);
      bump(d.new, +1);
    }
  }

  // ---- the stream
  var source = null;

  function stop(text) {
    stopped = true;
    if (source) source.close();
    setLive('off', text);
  }

  function connect() {
    var url = body.getAttribute('data-stream');
    if (!url || !window.EventSource || stopped) return;
    setLive('connecting', 'Connecting\u2026');
    source = new EventSource(url);
    // Catch up on anything that changed between rendering and connecting.
    source.addEventListener('ready', function () { setLive('live', 'Live'); schedule(0); });
    source.addEventListener('status_changed', function (e) {
      try { patchStatus(JSON.parse(e.data)); } catch (err) { /* the refetch still runs */ }
      schedule();
    });
    ['incident_opened', 'incident_resolved', 'lagged'].forEach(function (name) {
      source.addEventListener(name, function () { schedule(); });
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. the session ended): find out, and try again later.
        setLive('down', 'Disconnected');
        source = null;
        refresh();
        setTimeout(connect, 10000);
      } else {
        setLive('connecting', 'Reconnecting\u2026');
      }
    };
  }

  connect();

  var every = parseInt(body.getAttribute('data-refresh') || '', 10);
  if (every > 0) {
    setInterval(function () { if (document.visibilityState === 'visible') schedule(0); }, every * 1000);
  }
  document.addEventListener('visibilitychange', function () {
    if (document.visibilityState === 'visible' && body.hasAttribute('data-stream')) schedule(0);
  });

  applyQuickFilter();
  markScrollable();
})();
