// edge-llm chat page.
//
// Plain ES modules, no framework. The page is one list, one thread and one
// composer: a few render functions cover that in less code than a framework
// costs to download and parse on a Raspberry Pi (Vue's ESM build is ~40 KB
// gzipped), and Vue's in-browser template compiler needs 'unsafe-eval', which
// the page's CSP (default-src 'self') forbids. No build step, no Node.
//
// All state lives on the server (sessions = conversations). The page keeps
// only the id of the open conversation in localStorage, plus what the server
// does not store: the timings of answers generated while the page was open.
import { api } from './api.js';
import { ChatSocket } from './socket.js';
import { renderMarkdown, toSafeHtml } from './markdown.js';

const STORAGE_KEY = 'edge-llm.open-session';
const PAINT_MS = 50; // at most one markdown repaint per 50 ms while streaming
const MAX_AUTO_RETRIES = 5; // then the user decides (Retry button)
const STOP_TIMEOUT_MS = 10000; // Stop not confirmed by then: drop the socket
const NARROW = window.matchMedia('(max-width: 760px)');

const $ = (id) => document.getElementById(id);
const el = {
  sidebar: $('sidebar'), scrim: $('scrim'), navToggle: $('nav-toggle'),
  list: $('conversation-list'), listEmpty: $('list-empty'), loadMore: $('load-more'),
  modelName: $('model-name'), connState: $('conn-state'), connText: $('conn-text'), connPill: $('conn-pill'),
  title: $('chat-title'), scroller: $('scroller'), empty: $('empty'), emptyModel: $('empty-model'),
  messages: $('messages'),
  banner: $('banner'), bannerText: $('banner-text'), bannerCount: $('banner-count'),
  bannerRetry: $('banner-retry'), bannerClose: $('banner-close'),
  composer: $('composer'), message: $('message'), send: $('send'), stop: $('stop'),
  editBar: $('edit-bar'), editCancel: $('edit-cancel'), hintText: $('hint-text'), charCount: $('char-count'),
  settings: $('settings'), settingsForm: $('settings-form'), settingsOpen: $('settings-open'),
  settingsCancel: $('settings-cancel'), settingsNote: $('settings-note'), settingsError: $('settings-error'),
  announcer: $('announcer'),
};

const emptyDraft = () => ({ system_prompt: '', defaults: {} });

const state = {
  info: null, // GET api/info, or null until it answers
  sessions: [], // the sidebar, most recently updated first
  nextPageToken: '',
  current: null, // the open session with its messages; null = a new chat not yet on the server
  draft: emptyDraft(), // settings chosen for that new chat
  turn: null, // see below
  editing: null, // { replaceLast } while the composer holds an edited question
  renamingId: null,
  lastActions: {}, // what Edit / Regenerate act on, set by renderThread
  meta: new Map(), // `${sessionId}\n${answer}` -> timings of answers seen in this view
};

// A turn is one question and its streamed answer. Its status goes
// 'creating' (new chat being created) -> 'waiting' (sent) -> 'streaming'
// (admitted) -> 'stopping' (Stop pressed), and then either it is committed to
// state.current.messages (the server kept it) or it stays on screen as
// 'unsaved' (stopped, not stored) or 'failed' (refused, or the connection
// dropped) until the next send.
const ACTIVE = new Set(['creating', 'waiting', 'streaming', 'stopping']);
const busy = () => state.turn !== null && ACTIVE.has(state.turn.status);
const metaKey = (sessionId, text) => `${sessionId}\n${text.trim()}`;

const socket = new ChatSocket(onFrame, onSocketState);

// ---------------------------------------------------------------- storage

function remember(id) {
  try {
    if (id) localStorage.setItem(STORAGE_KEY, id);
    else localStorage.removeItem(STORAGE_KEY);
  } catch {
    // Storage off (private mode, kiosk policy): the page still works.
  }
}

function remembered() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- banner

// One banner above the composer for errors and notices, with at most one
// Retry button; an optional countdown runs `countdown.then` when it ends.
const banner = { tag: '', retry: null, timer: 0 };

function showBanner(text, { kind = 'error', tag = '', retry = null, countdown = null } = {}) {
  clearInterval(banner.timer);
  banner.tag = tag;
  banner.retry = retry;
  el.banner.dataset.kind = kind;
  el.bannerText.textContent = text;
  el.bannerCount.textContent = '';
  el.bannerRetry.hidden = !retry;
  el.banner.hidden = false;
  if (countdown) {
    let left = Math.max(1, Math.ceil(countdown.seconds));
    const tick = () => { el.bannerCount.textContent = `Retrying in ${left} s.`; };
    tick();
    banner.timer = setInterval(() => {
      left -= 1;
      if (left > 0) return tick();
      clearInterval(banner.timer);
      el.bannerCount.textContent = 'Retrying…';
      countdown.then();
    }, 1000);
  }
}

function hideBanner(tag) {
  if (tag !== undefined && banner.tag !== tag) return;
  clearInterval(banner.timer);
  banner.retry = null;
  banner.tag = '';
  el.banner.hidden = true;
}

function statusText(status, message) {
  switch (status) {
    case 0: return "Can't reach the appliance. Check that it is on and on the network.";
    case 429: return 'The model is busy with other requests.';
    case 503: return 'The model is loading or the server is restarting.';
    case 409: return 'This conversation is still answering another message, maybe on another device.';
    default: return message || `Something went wrong (${status}).`;
  }
}

/** Show a failed HTTP call; 429 and 503 retry by themselves a few times. */
function showApiError(err, retry, attempt = 0) {
  const wait = err.status === 429 || err.status === 503 ? err.retryAfter ?? 5 : 0;
  const auto = retry && wait > 0 && attempt < MAX_AUTO_RETRIES;
  showBanner(statusText(err.status, err.message), {
    retry,
    countdown: auto ? { seconds: wait, then: () => retry(attempt + 1) } : null,
  });
}

function announce(text) {
  el.announcer.textContent = '';
  setTimeout(() => { el.announcer.textContent = text; }, 50);
}

// ---------------------------------------------------------------- socket

let pendingRetry = null; // run once the socket is open again
let wasOpen = false;

function onSocketState({ state: s, retryIn, code }) {
  el.connState.dataset.state = s;
  el.connPill.dataset.state = s;
  const text = { open: 'Connected', connecting: 'Connecting…', closed: 'Offline' }[s];
  el.connText.textContent = text;
  el.connPill.textContent = s === 'closed' ? 'Offline' : text;
  el.connPill.hidden = s === 'open' || (s === 'connecting' && !wasOpen);

  if (s === 'open') {
    hideBanner('connection');
    const lost = state.turn?.status === 'failed' && state.turn.error?.status === 0 ? state.turn : null;
    if (pendingRetry) {
      const run = pendingRetry;
      pendingRetry = null;
      run();
    } else if (lost) {
      showBanner('The connection dropped while answering.', { retry: () => retryTurn(lost) });
    }
    if (wasOpen) resync(); // another device may have changed things meanwhile
    wasOpen = true;
  } else if (s === 'closed') {
    const t = state.turn;
    let interrupted = null;
    if (t?.status === 'stopping') {
      cancelPaint(); // stopped either way; the server keeps nothing of it
      t.status = 'unsaved';
      t.meta = { finish: 'cancelled' };
      renderThread();
    } else if (t && ACTIVE.has(t.status) && t.status !== 'creating') {
      cancelPaint();
      t.status = 'failed';
      t.error = { status: 0 };
      interrupted = t;
      renderThread();
    }
    const why = {
      1009: 'The message was too large for the server.',
      1001: 'The server is restarting.',
      1012: 'The server is restarting.',
      1013: 'The server is restarting.',
      4000: 'The server did not confirm Stop, so the page reconnects.',
    }[code] ?? "Can't reach the appliance.";
    // Retry reconnects now; a turn cut off is offered again once connected.
    showBanner(interrupted ? `${why} The answer was interrupted.` : why, {
      tag: 'connection',
      retry: interrupted ? () => retryTurn(interrupted) : () => socket.reconnectNow(),
      countdown: { seconds: retryIn, then: () => {} }, // the socket's own timer reconnects
    });
  }
  updateComposer();
}

function onFrame(frame) {
  const t = state.turn;
  if (!t || !ACTIVE.has(t.status)) return; // late frames of a turn given up on
  switch (frame.type) {
    case 'start':
      if (t.status === 'waiting') t.status = 'streaming';
      refreshListSoon(); // the server titles a new chat from its first question
      updateLiveStatus();
      updateComposer();
      break;
    case 'delta':
      if (t.status === 'waiting') t.status = 'streaming';
      t.text += frame.text ?? '';
      schedulePaint();
      break;
    case 'done':
      finishTurn(frame);
      break;
    case 'error':
      turnRefused(frame);
      break;
    default:
      break; // frame types added later are ignored, not fatal
  }
}

// ---------------------------------------------------------------- turns

const utf8 = new TextEncoder();

/** How much of the server's size limit `text` uses (limit 0: not known yet). */
function messageSize(text) {
  const limits = state.info?.limits ?? {};
  if (limits.max_message_bytes) {
    return { used: utf8.encode(text).length, limit: limits.max_message_bytes, unit: 'bytes' };
  }
  return { used: text.length, limit: limits.max_message_chars ?? 0, unit: 'characters' };
}

/** Start a turn; false (and nothing sent) when it cannot go now. */
function sendTurn(content, replaceLast, attempt = 0) {
  if (busy() || !content.trim()) return false;
  const size = messageSize(content);
  if (size.limit && size.used > size.limit) {
    showBanner(`A message can be at most ${size.limit.toLocaleString()} ${size.unit}.`);
    return false;
  }
  if (!socket.isOpen) {
    showBanner('Not connected to the appliance, so nothing was sent.', {
      tag: 'connection', retry: () => socket.reconnectNow(),
    });
    return false;
  }
  hideBanner();
  state.turn = {
    sessionId: state.current?.id ?? null,
    status: state.current ? 'waiting' : 'creating',
    content, replaceLast, attempt, text: '', meta: null, error: null,
  };
  state.editing = null;
  renderThread();
  scrollToBottom();
  updateComposer();
  dispatch(state.turn);
  return true;
}

async function dispatch(t) {
  if (t.status === 'creating') {
    let created;
    try {
      created = await api.createSession(draftBody());
    } catch (err) {
      if (state.turn !== t) return;
      t.status = 'failed';
      t.error = { status: err.status };
      renderThread();
      updateComposer();
      showApiError(err, (n) => retryTurn(t, n), t.attempt);
      return;
    }
    const stillDraft = state.current === null;
    t.sessionId = created.id;
    t.status = 'waiting';
    state.sessions = [created, ...state.sessions.filter((s) => s.id !== created.id)];
    if (stillDraft) {
      state.current = { ...created, messages: created.messages ?? [] };
      state.draft = emptyDraft();
      remember(created.id);
      renderHeader();
    }
    renderList();
  }
  const sent = socket.send({
    type: 'send', session_id: t.sessionId, content: t.content, replace_last: t.replaceLast,
  });
  if (!sent) {
    t.status = 'failed';
    t.error = { status: 0 };
    renderThread();
    updateComposer();
    showBanner("Can't reach the appliance.", { tag: 'connection', retry: () => retryTurn(t) });
  }
}

function draftBody() {
  const defaults = Object.fromEntries(
    Object.entries(state.draft.defaults).filter(([, v]) => v !== null && v !== undefined),
  );
  return { system_prompt: state.draft.system_prompt, defaults };
}

/** Send a failed or unsaved turn again (Retry, Regenerate after a stop). */
function retryTurn(t, attempt = 0) {
  if (busy() || state.turn !== t) return;
  if (!socket.isOpen) {
    pendingRetry = () => retryTurn(t, attempt);
    socket.reconnectNow();
    return;
  }
  state.turn = null;
  sendTurn(t.content, t.replaceLast, attempt);
}

function stopTurn() {
  const t = state.turn;
  if (!t || (t.status !== 'waiting' && t.status !== 'streaming')) return;
  t.status = 'stopping';
  socket.send({ type: 'stop' }); // the server stops generating and answers 'done'
  // Should that 'done' never come, a new connection frees the page (and the
  // server cancels whatever the old one was running).
  setTimeout(() => {
    if (state.turn === t && t.status === 'stopping') socket.reset();
  }, STOP_TIMEOUT_MS);
  updateLiveStatus();
  updateComposer();
}

function finishTurn(frame) {
  const t = state.turn;
  cancelPaint();
  const timings = frame.timings ?? {};
  const meta = {
    finish: frame.finish_reason,
    tps: timings.decode_tokens_per_second,
    ttft: timings.time_to_first_token_ms,
    queueMs: timings.queue_ms,
    notice: frame.notice || '',
  };
  if (frame.kept) {
    state.meta.set(metaKey(t.sessionId, t.text), meta);
    const s = state.current;
    if (s?.id === t.sessionId) {
      const kept = t.replaceLast ? dropLastPair(s.messages) : s.messages;
      s.messages = [...kept, { role: 'user', content: t.content }, { role: 'assistant', content: t.text }];
    }
    state.turn = null;
  } else {
    t.status = 'unsaved';
    t.meta = meta;
    if (t.replaceLast) showBanner('Stopped. The previous answer was kept.', { kind: 'info' });
  }
  renderThread();
  updateComposer();
  announce(t.text.trim() ? `Answer: ${plainText(t.text)}` : 'The answer is empty.');
  refreshList();
  if (frame.kept) syncCurrent();
}

function turnRefused(frame) {
  const t = state.turn;
  cancelPaint();
  const status = Number(frame.status) || 500;
  if (status === 400 || status === 404) {
    // Nothing to retry as is: give the text back to fix or resend.
    state.turn = null;
    if (!el.message.value) {
      el.message.value = t.content;
      if (t.replaceLast) state.editing = { replaceLast: true };
    }
    if (status === 404) {
      state.sessions = state.sessions.filter((s) => s.id !== t.sessionId);
      if (state.current?.id === t.sessionId) openNewChat({ keepText: true });
      showBanner('That conversation no longer exists (deleted on another device?). Your message is back in the box.');
      refreshList();
    } else {
      showBanner(frame.message || 'The server refused this message.');
    }
  } else {
    t.status = 'failed';
    t.error = { status };
    const wait = status === 429 || status === 503 ? frame.retry_after ?? 5 : 0;
    const auto = wait > 0 && t.attempt < MAX_AUTO_RETRIES;
    showBanner(statusText(status, frame.message), {
      retry: () => retryTurn(t),
      countdown: auto ? { seconds: wait, then: () => retryTurn(t, t.attempt + 1) } : null,
    });
  }
  renderThread();
  updateComposer();
}

function dropLastPair(messages) {
  const i = messages.findLastIndex((m) => m.role === 'user');
  return i >= 0 ? messages.slice(0, i) : messages;
}

function plainText(markdown) {
  const div = document.createElement('div');
  div.innerHTML = toSafeHtml(markdown); // DOMPurify output, never attached
  return div.textContent.replace(/\s+/g, ' ').trim();
}

// ---------------------------------------------------------------- painting

// Deltas only append to the turn's text; the markdown is rendered again at
// most every PAINT_MS, so a fast model costs ~20 renders a second, not one
// per token.
let paintTimer = 0;
let lastPaint = 0;

function schedulePaint() {
  if (paintTimer) return;
  const wait = Math.max(0, lastPaint + PAINT_MS - performance.now());
  paintTimer = setTimeout(paintLive, wait);
}

function cancelPaint() {
  clearTimeout(paintTimer);
  paintTimer = 0;
}

function paintLive() {
  paintTimer = 0;
  lastPaint = performance.now();
  const body = $('live-answer');
  if (!body || !state.turn) return;
  const pinned = isPinned();
  renderMarkdown(body, state.turn.text, { live: true });
  updateLiveStatus();
  if (pinned) scrollToBottom();
}

function isPinned() {
  const s = el.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  el.scroller.scrollTop = el.scroller.scrollHeight;
}

// ---------------------------------------------------------------- rendering

function fromTemplate(id) {
  return $(id).content.firstElementChild.cloneNode(true);
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function metaText(meta, { unsaved = false } = {}) {
  const parts = [];
  if (meta) {
    if (Number.isFinite(meta.tps)) parts.push(`${meta.tps.toFixed(1)} tokens/s`);
    if (Number.isFinite(meta.ttft)) parts.push(`${formatMs(meta.ttft)} to first token`);
    if (Number.isFinite(meta.queueMs) && meta.queueMs >= 1000) parts.push(`waited ${formatMs(meta.queueMs)}`);
    if (meta.finish === 'length') parts.push('cut off at the token limit');
    if (meta.finish === 'cancelled') parts.push('stopped');
  }
  if (unsaved) parts.push('not saved');
  return parts.join(' · ');
}

function userMessage(content, note = '') {
  const node = fromTemplate('tpl-user');
  node.querySelector('.msg-body').textContent = content;
  node.querySelector('.msg-meta').textContent = note;
  return node;
}

function assistantMessage(content, meta, { unsaved = false } = {}) {
  const node = fromTemplate('tpl-assistant');
  renderMarkdown(node.querySelector('.msg-body'), content);
  node.querySelector('.msg-meta').textContent = metaText(meta, { unsaved });
  if (meta?.notice) {
    const notice = node.querySelector('.msg-notice');
    notice.textContent = meta.notice;
    notice.hidden = false;
  }
  return node;
}

function liveMessage(t) {
  const node = fromTemplate('tpl-assistant');
  node.classList.add('live');
  const body = node.querySelector('.msg-body');
  body.id = 'live-answer';
  if (t.text) renderMarkdown(body, t.text, { live: true });
  return node;
}

/** The typing dots and the status line of the answer being written. */
function updateLiveStatus() {
  const body = $('live-answer');
  const t = state.turn;
  if (!body || !t) return;
  const waiting = !t.text && ACTIVE.has(t.status);
  body.classList.toggle('waiting', waiting);
  body.classList.toggle('streaming', t.status === 'streaming' && Boolean(t.text));
  const meta = body.parentElement.querySelector('.msg-meta');
  meta.textContent = {
    creating: 'Starting a new chat…',
    waiting: 'Waiting for the model…',
    streaming: t.text ? '' : 'Thinking…',
    stopping: 'Stopping…',
  }[t.status] ?? '';
}

function renderHeader() {
  const s = state.current;
  const title = s ? s.title || 'Untitled' : 'New chat';
  el.title.textContent = title;
  document.title = `${title} · edge-llm`;
}

function renderThread() {
  const s = state.current;
  const t = state.turn && state.turn.sessionId === (s?.id ?? null) ? state.turn : null;
  const active = t !== null && ACTIVE.has(t.status);
  let messages = s?.messages ?? [];
  if (active && t.replaceLast) messages = dropLastPair(messages);
  // A stopped or failed regenerate/edit left the old pair in place: show that.
  const showTurn = t !== null && (active || !t.replaceLast);

  const nodes = [];
  let lastUser = null;
  let lastUserAction = null;
  for (const m of messages) {
    if (m.role === 'user') {
      lastUser = userMessage(m.content);
      lastUserAction = { content: m.content, replaceLast: true };
      nodes.push(lastUser);
    } else if (m.role === 'assistant') {
      nodes.push(assistantMessage(m.content, state.meta.get(metaKey(s.id, m.content))));
    }
  }
  let regenerate = lastUserAction && nodes.at(-1)?.classList.contains('msg-assistant')
    ? lastUserAction : null;
  if (showTurn) {
    const note = t.status === 'failed' ? (t.error?.status === 0 ? 'Interrupted' : 'Not sent') : '';
    lastUser = userMessage(t.content, note);
    lastUserAction = { content: t.content, replaceLast: false, turn: t };
    regenerate = null;
    nodes.push(lastUser);
    if (active) nodes.push(liveMessage(t));
    else if (t.text || t.status === 'unsaved') {
      nodes.push(assistantMessage(t.text, t.meta, { unsaved: true }));
      regenerate = lastUserAction;
    }
  }

  // Edit and Regenerate act on the last question and answer only.
  for (const node of nodes) {
    const action = node.querySelector('[data-action="edit"], [data-action="regenerate"]');
    if (action) action.hidden = true;
  }
  if (!busy()) {
    if (lastUser && lastUserAction) lastUser.querySelector('[data-action="edit"]').hidden = false;
    if (regenerate) nodes.at(-1).querySelector('[data-action="regenerate"]').hidden = false;
  }
  state.lastActions = { edit: lastUserAction, regenerate };

  el.messages.replaceChildren(...nodes);
  el.empty.hidden = nodes.length > 0;
  if (active) updateLiveStatus();
}

function renderList() {
  const items = state.sessions.map((s) => {
    const li = fromTemplate('tpl-conversation');
    li.dataset.id = s.id;
    const link = li.querySelector('.conv-link');
    link.href = `#${s.id}`;
    link.textContent = s.title || 'Untitled';
    link.title = link.textContent;
    if (s.id === state.current?.id) {
      li.classList.add('active');
      link.setAttribute('aria-current', 'page');
    }
    if (s.id === state.renamingId) {
      const input = document.createElement('input');
      input.className = 'conv-rename';
      input.value = s.title || '';
      input.setAttribute('aria-label', 'Conversation title');
      input.maxLength = 200;
      link.replaceWith(input);
    }
    return li;
  });
  el.list.replaceChildren(...items);
  el.listEmpty.hidden = state.sessions.length > 0;
  el.loadMore.hidden = !state.nextPageToken;
}

function renderInfo() {
  const m = state.info?.model;
  el.modelName.textContent = m ? [m.name, m.quantization].filter(Boolean).join(' · ') : '';
  el.emptyModel.textContent = m
    ? `${m.name} answers here, on this device.`
    : 'Answers are generated on this device.';
  const limit = state.info?.limits?.max_tokens;
  if (limit) el.settingsForm.elements.max_tokens.max = String(limit);
  const def = state.info?.limits?.default_max_tokens;
  if (def) el.settingsForm.elements.max_tokens.placeholder = `Default (${def})`;
}

function render() {
  renderHeader();
  renderList();
  renderThread();
  updateComposer();
}

function updateComposer() {
  const text = el.message.value;
  const { used, limit, unit } = messageSize(text);
  const over = limit > 0 && used > limit;
  const t = state.turn;
  el.send.disabled = busy() || !text.trim() || over;
  el.stop.disabled = !(t && (t.status === 'waiting' || t.status === 'streaming'));
  el.editBar.hidden = !state.editing;
  el.charCount.textContent = limit && used > limit * 0.8
    ? `${used.toLocaleString()} / ${limit.toLocaleString()} ${unit}` : '';
  el.charCount.classList.toggle('over', over);
  const elsewhere = busy() && t.sessionId !== (state.current?.id ?? null);
  el.hintText.textContent = elsewhere
    ? 'Still answering in another conversation; Stop ends it.'
    : 'Enter to send, Shift+Enter for a new line';
}

// ---------------------------------------------------------------- server data

async function loadInfo() {
  try {
    state.info = await api.info();
    renderInfo();
    updateComposer();
  } catch {
    // Not fatal: limits fall back to the server's checks; tried again on reconnect.
  }
}

async function refreshList() {
  try {
    const page = await api.listSessions();
    state.sessions = page.sessions ?? [];
    state.nextPageToken = page.next_page_token ?? '';
    // The open conversation's title may have been set by the server meanwhile.
    const mine = state.sessions.find((s) => s.id === state.current?.id);
    if (mine && state.current.title !== mine.title) {
      state.current.title = mine.title;
      renderHeader();
    }
    renderList();
    return true;
  } catch (err) {
    showApiError(err, (n) => refreshList(n));
    return false;
  }
}

let refreshTimer = 0;
function refreshListSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshList, 300);
}

async function loadMore() {
  const token = state.nextPageToken;
  if (!token) return;
  try {
    const page = await api.listSessions(token);
    const known = new Set(state.sessions.map((s) => s.id));
    state.sessions.push(...(page.sessions ?? []).filter((s) => !known.has(s.id)));
    state.nextPageToken = page.next_page_token ?? '';
    renderList();
  } catch (err) {
    showApiError(err, loadMore);
  }
}

let openSeq = 0; // only the latest click's answer is shown
async function openSession(id) {
  const seq = ++openSeq;
  closeNav();
  try {
    const s = await api.getSession(id);
    if (seq !== openSeq) return;
    if (state.turn && !ACTIVE.has(state.turn.status)) state.turn = null;
    if (banner.tag !== 'connection') hideBanner();
    state.current = s;
    state.editing = null;
    remember(s.id);
    render();
    scrollToBottom();
  } catch (err) {
    if (seq !== openSeq) return;
    if (err.status === 404) {
      state.sessions = state.sessions.filter((s) => s.id !== id);
      openNewChat();
      showBanner('That conversation no longer exists.', { kind: 'info' });
    } else {
      showApiError(err, () => openSession(id));
    }
  }
}

/** Bring the open conversation in line with the server (another device, a reconnect). */
async function syncCurrent() {
  const id = state.current?.id;
  if (!id) return;
  try {
    const s = await api.getSession(id);
    if (state.current?.id !== id || busy()) return;
    const same = s.title === state.current.title
      && JSON.stringify(s.messages) === JSON.stringify(state.current.messages);
    state.current = s;
    if (!same) {
      const pinned = isPinned();
      renderHeader();
      renderThread();
      if (pinned) scrollToBottom();
    }
  } catch (err) {
    if (err.status === 404 && state.current?.id === id) {
      openNewChat();
      showBanner('This conversation was deleted, maybe on another device.', { kind: 'info' });
    }
  }
}

function resync() {
  if (!state.info) loadInfo();
  refreshList();
  if (!busy()) syncCurrent();
}

function openNewChat({ keepText = false } = {}) {
  openSeq += 1;
  if (banner.tag !== 'connection') hideBanner();
  if (state.turn && !ACTIVE.has(state.turn.status)) state.turn = null;
  state.current = null;
  state.draft = emptyDraft();
  state.editing = null;
  if (!keepText) el.message.value = '';
  remember(null);
  closeNav();
  render();
}

async function renameSession(id, title) {
  if (state.renamingId !== id) return; // Enter already saved it; this is the blur
  state.renamingId = null;
  const s = state.sessions.find((x) => x.id === id);
  title = title.trim();
  if (!s || title === (s.title || '')) {
    renderList();
    return;
  }
  s.title = title;
  if (state.current?.id === id) state.current.title = title;
  renderList();
  renderHeader();
  try {
    const updated = await api.updateSession(id, { title });
    s.title = updated.title;
    if (state.current?.id === id) state.current.title = updated.title;
    renderList();
    renderHeader();
  } catch (err) {
    showApiError(err, null);
    refreshList();
  }
}

async function deleteSession(id) {
  if (state.turn?.sessionId === id && busy()) stopTurn();
  try {
    await api.deleteSession(id);
  } catch (err) {
    if (err.status !== 404) {
      showApiError(err, () => deleteSession(id));
      return;
    }
  }
  state.sessions = state.sessions.filter((s) => s.id !== id);
  if (state.current?.id === id) openNewChat();
  else renderList();
  announce('Conversation deleted.');
  if (window.matchMedia('(pointer: fine)').matches) el.message.focus({ preventScroll: true });
}

// ---------------------------------------------------------------- settings

function openSettings() {
  const src = state.current ?? state.draft;
  const f = el.settingsForm.elements;
  f.system_prompt.value = src.system_prompt ?? '';
  f.temperature.value = src.defaults?.temperature ?? '';
  f.max_tokens.value = src.defaults?.max_tokens ?? '';
  el.settingsNote.textContent = state.current
    ? 'Empty fields use the server defaults. Changes apply to the next answers.'
    : 'For the new chat. Empty fields use the server defaults.';
  el.settingsError.hidden = true;
  el.settings.showModal();
}

function settingsError(text) {
  el.settingsError.textContent = text;
  el.settingsError.hidden = false;
}

async function saveSettings(event) {
  event.preventDefault();
  const f = el.settingsForm.elements;
  const temperature = f.temperature.value.trim() === '' ? null : Number(f.temperature.value);
  const maxTokens = f.max_tokens.value.trim() === '' ? null : Number(f.max_tokens.value);
  const limit = state.info?.limits?.max_tokens ?? Infinity;
  if (temperature !== null && !(temperature >= 0 && temperature <= 2)) {
    return settingsError('Temperature is a number from 0 to 2.');
  }
  if (maxTokens !== null && !(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= limit)) {
    return settingsError(`Max tokens is a whole number from 1 to ${limit === Infinity ? 'the model limit' : limit}.`);
  }
  // PATCH replaces all the defaults: keep those this form does not show
  // (top_p, seed, stop...); null hands a field back to the server's default.
  const settings = {
    system_prompt: f.system_prompt.value,
    defaults: { ...(state.current?.defaults ?? {}), temperature, max_tokens: maxTokens },
  };
  if (!state.current) {
    state.draft = settings; // applied when the first message creates the chat
    el.settings.close();
    return;
  }
  const id = state.current.id;
  try {
    const updated = await api.updateSession(id, settings);
    if (state.current?.id === id) {
      state.current.system_prompt = updated.system_prompt;
      state.current.defaults = updated.defaults;
    }
    el.settings.close();
  } catch (err) {
    settingsError(err.status === 0 ? statusText(0) : err.message);
  }
}

// ---------------------------------------------------------------- small helpers

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the old way
    }
  }
  // Kiosks usually serve plain http on the LAN, where the Clipboard API is off.
  const helper = document.createElement('textarea');
  helper.className = 'clipboard-helper';
  helper.value = text;
  helper.setAttribute('readonly', '');
  document.body.append(helper);
  helper.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  helper.remove();
  return ok;
}

function startEdit() {
  const target = state.lastActions.edit;
  if (!target || busy()) return;
  state.editing = { replaceLast: target.replaceLast };
  el.message.value = target.content;
  updateComposer();
  el.message.focus();
  el.message.setSelectionRange(target.content.length, target.content.length);
}

function cancelEdit() {
  state.editing = null;
  el.message.value = '';
  updateComposer();
  el.message.focus();
}

function regenerate() {
  const target = state.lastActions.regenerate;
  if (!target || busy()) return;
  if (target.turn) retryTurn(target.turn); // a stopped answer that was never stored
  else sendTurn(target.content, true);
}

function openNav() {
  document.body.classList.add('nav-open');
  el.navToggle.setAttribute('aria-expanded', 'true');
  el.sidebar.querySelector('.new-chat').focus();
}

function closeNav() {
  if (!document.body.classList.contains('nav-open')) return;
  document.body.classList.remove('nav-open');
  el.navToggle.setAttribute('aria-expanded', 'false');
  if (NARROW.matches && el.sidebar.contains(document.activeElement)) el.navToggle.focus();
}

// Browsers without `field-sizing: content` grow the box from script.
const autoGrow = CSS.supports('field-sizing', 'content')
  ? () => {}
  : () => {
    el.message.style.height = 'auto';
    el.message.style.height = `${Math.min(el.message.scrollHeight, 240)}px`;
  };

// ---------------------------------------------------------------- wiring

function bind() {
  el.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = el.message.value;
    if (sendTurn(text, state.editing?.replaceLast ?? false)) {
      el.message.value = '';
      autoGrow();
      updateComposer();
    }
  });
  el.message.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      if (!el.send.disabled) el.composer.requestSubmit();
    } else if (event.key === 'Escape' && state.editing) {
      cancelEdit();
    }
  });
  el.message.addEventListener('input', () => {
    autoGrow();
    updateComposer();
  });
  el.stop.addEventListener('click', stopTurn);
  el.editCancel.addEventListener('click', cancelEdit);

  el.bannerRetry.addEventListener('click', () => {
    const retry = banner.retry;
    hideBanner();
    if (retry) retry();
  });
  el.bannerClose.addEventListener('click', () => hideBanner());

  for (const button of document.querySelectorAll('[data-action="new-chat"]')) {
    button.addEventListener('click', () => {
      openNewChat();
      el.message.focus();
    });
  }
  el.loadMore.addEventListener('click', loadMore);

  el.list.addEventListener('click', (event) => {
    const li = event.target.closest('li.conv');
    if (!li) return;
    const id = li.dataset.id;
    const action = event.target.closest('[data-action]')?.dataset.action;
    if (action === 'rename') {
      state.renamingId = id;
      renderList();
      const input = el.list.querySelector('.conv-rename');
      input.focus();
      input.select();
    } else if (action === 'delete') {
      deleteSession(id);
    } else if (event.target.closest('.conv-link')) {
      event.preventDefault();
      if (id !== state.current?.id) openSession(id);
      else closeNav();
    }
  });
  el.list.addEventListener('keydown', (event) => {
    if (!event.target.matches('.conv-rename')) return;
    const id = event.target.closest('li.conv').dataset.id;
    if (event.key === 'Enter') {
      event.preventDefault();
      renameSession(id, event.target.value);
    } else if (event.key === 'Escape') {
      state.renamingId = null;
      renderList();
    } else {
      return;
    }
    el.list.querySelector(`li[data-id="${id}"] .conv-link`)?.focus();
  });
  el.list.addEventListener('focusout', (event) => {
    if (!event.target.matches('.conv-rename')) return;
    renameSession(event.target.closest('li.conv').dataset.id, event.target.value);
  });

  el.messages.addEventListener('click', async (event) => {
    const button = event.target.closest('[data-action]');
    if (!button) return;
    const action = button.dataset.action;
    if (action === 'copy') {
      const code = button.closest('.codeblock').querySelector('code');
      const ok = await copyText(code.textContent);
      button.textContent = ok ? 'Copied' : 'Copy failed';
      button.focus();
      setTimeout(() => { button.textContent = 'Copy'; }, 1500);
    } else if (action === 'edit') {
      startEdit();
    } else if (action === 'regenerate') {
      regenerate();
    }
  });

  el.settingsOpen.addEventListener('click', openSettings);
  el.settingsCancel.addEventListener('click', () => el.settings.close());
  el.settingsForm.addEventListener('submit', saveSettings);
  el.settings.addEventListener('click', (event) => {
    if (event.target === el.settings) el.settings.close(); // a click on the backdrop
  });

  el.navToggle.addEventListener('click', () => {
    if (document.body.classList.contains('nav-open')) closeNav();
    else openNav();
  });
  el.scrim.addEventListener('click', closeNav);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && document.body.classList.contains('nav-open')) closeNav();
  });
  NARROW.addEventListener('change', () => closeNav());
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && wasOpen) resync();
  });
}

async function init() {
  bind();
  socket.connect();
  loadInfo();
  const listed = await refreshList();
  const fromHash = /^#([0-9a-f]{32})$/i.exec(location.hash)?.[1];
  const id = fromHash || remembered();
  // Skip a remembered id the list shows is gone (saves a 404 in the console).
  const gone = listed && !fromHash && !state.nextPageToken && !state.sessions.some((s) => s.id === id);
  if (id && !gone) await openSession(id);
  else openNewChat();
  if (window.matchMedia('(pointer: fine)').matches) el.message.focus();
}

init();
