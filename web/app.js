// The chat page served at `/`: a join form, the room's messages, files and
// typing indicator, and the connection state, on top of the browser client.
//
// Everything a user or the server provides is put on the page with
// textContent or as a DOM property, never parsed as HTML, so the page works
// under a strict Content-Security-Policy and a message such as
// `<img src=x onerror=alert(1)>` shows as those characters.

import { HubbubClient } from '/client.js';

/** What the ✓ on an own message means (its tooltip and spoken label). */
const DELIVERED = 'Delivered to the server';
/** How long "X is typing…" stays after the last typing event, in ms. */
const TYPING_VISIBLE_MS = 3000;
/** Messages from one person closer together than this are grouped. */
const GROUP_WINDOW_MS = 5 * 60 * 1000;
/** How often the join form refreshes the list of active rooms, in ms. */
const ROOMS_REFRESH_MS = 15000;
/** Room suggestions shown as buttons under the form. */
const MAX_ROOM_CHIPS = 6;
/** Avatar colours (classes c0..c7 in style.css). */
const AVATAR_COLOURS = 8;
/** Where the last username is remembered. */
const USERNAME_KEY = 'hubbub.username';
/** Where the room is remembered, so a reload rejoins it. */
const ROOM_KEY = 'hubbub.room';
/** A reader closer than this to the end of the list (px) counts as at the bottom. */
const NEAR_BOTTOM_PX = 80;
/** Messages shown when entering a room, and loaded per step when scrolling up. */
const HISTORY_PAGE = 50;
/** A reader closer than this to the top of the list (px) gets earlier messages. */
const NEAR_TOP_PX = 150;

/**
 * Page options, from the query string (docs/CLIENT-JS.md lists them):
 * `?room=NAME` fills in the room; the others change waits, for tests and for
 * deployments that want them shorter or longer.
 */
const query = new URLSearchParams(location.search);

/** A duration option in ms, kept within [min, max]; `fallback` when absent or not a number. */
function msOption(name, fallback, min, max) {
  const raw = query.get(name);
  const value = raw === null || raw.trim() === '' ? NaN : Number(raw);
  return Number.isFinite(value) ? Math.min(Math.max(value, min), max) : fallback;
}

/** The longest wait between two reconnect attempts (ms); the page never stops trying. */
const RECONNECT_MAX_DELAY_MS = msOption('reconnectMaxDelay', 30000, 100, 3600000);
/** The first wait after the link is lost (ms), doubling up to the longest. */
const RECONNECT_DELAY_MS = msOption('reconnectDelay', Math.min(1000, RECONNECT_MAX_DELAY_MS), 100, 3600000);
/**
 * How long a `userLeft` waits before it is shown (ms). A member who joins
 * again within it (a reload, a reconnect, a server restart) was never away
 * as far as the reader is concerned, and neither line is shown.
 */
const LEAVE_GRACE_MS = msOption('leaveGrace', 5000, 0, 600000);

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $('conn'),
  connText: $('conn-text'),
  connAnnounce: $('conn-announce'),
  latency: $('latency'),
  retry: $('retry'),
  joinView: $('join-view'),
  joinForm: $('join-form'),
  username: $('username'),
  room: $('room'),
  roomList: $('room-list'),
  activeRooms: $('active-rooms'),
  roomChips: $('room-chips'),
  joinError: $('join-error'),
  joinButton: $('join-button'),
  chatView: $('chat-view'),
  chatRoom: $('chat-room'),
  chatCount: $('chat-count'),
  leaveButton: $('leave-button'),
  messages: $('messages'),
  typing: $('typing'),
  composer: $('composer'),
  fileInput: $('file-input'),
  attachButton: $('attach-button'),
  message: $('message'),
  dropOverlay: $('drop-overlay'),
  newMessages: $('new-messages'),
};

const client = new HubbubClient(undefined, {
  reconnect: { initialDelay: RECONNECT_DELAY_MS, maxDelay: RECONNECT_MAX_DELAY_MS, maxAttempts: Infinity },
});

/** The username the server confirmed. */
let me = null;
/** The room shown, or null on the join form. */
let currentRoom = null;
/** The next userJoined for `me` is our own (re)join, not news. */
let expectOwnJoin = false;
/** Whether a "connection lost" line was shown and awaits "reconnected". */
let announcedLoss = false;
/**
 * Members known to be in the room (seen to join, write, type or share
 * since this page entered it), so that one who joins again without a
 * `userLeft` in between (the server went away, say) is not news.
 */
const present = new Set();
/** `userLeft`s not shown yet: name -> the timer that shows it. */
const pendingLeaves = new Map();
/**
 * After this page's own reconnection, joins up to the count the room had
 * before the link was lost are members coming back, until `until`
 * (performance.now()).
 */
let returnWindow = { until: 0, count: 0 };
/** The last member count the server told, or null while it is unknown. */
let lastCount = null;
/** The count when the link was lost. */
let countBeforeLoss = null;
/**
 * True while the reader is at the bottom of the list: then everything that
 * arrives, and everything that grows (an image loading), keeps them there.
 * Only the reader's own scrolling clears it.
 */
let pinned = true;
/** The list's scrollTop at the last scroll event, to tell up from down. */
let lastScrollTop = 0;
/** Messages that arrived below a reader who scrolled up. */
let unseenBelow = 0;
/** Own messages on the page, by clientMsgId, until acknowledged. */
const ownPending = new Map();
/**
 * Room messages on the page by `epoch:offset`, so that one that comes again
 * (in history, in a replay after a reconnect) is never shown twice.
 */
const shown = new Map();
/** Own shared files on the page by fileId (their share's offset is not told to the sender). */
const ownFiles = new Map();
/** The epoch of the room's stream the page shows, or null (a server without history). */
let roomEpoch = null;
/** The "You joined" line and the room's newest offset then: older messages go above it. */
let joinAnchor = null;
/** Whether the room has messages older than the oldest shown (null: not known yet). */
let hasEarlier = null;
/** True while earlier messages are being fetched. */
let loadingEarlier = false;
/** Bumped when the page changes rooms, so a late history answer is dropped. */
let historyToken = 0;
/** The first message replayed after this page's reconnection gets the "while you were away" line. */
let awayPending = false;
/** The line at the top of the list: "Loading earlier messages…" or "The beginning of #room". */
let edgeLine = null;
/** Upload items on the page, by transferId. */
const uploads = new Map();
/** Who is typing: name -> timer that forgets them. */
const typists = new Map();
let unread = 0;
let statusTicker = null;
/** The last state announced to screen readers (the countdown is not). */
let announcedState = null;
let roomsTimer = null;

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fullTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

// ---- small DOM helpers -------------------------------------------------------

/** Creates an element with a class and, optionally, text (never HTML). */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function timeElement(timestamp) {
  const date = new Date(timestamp);
  const node = el('time', 'time', timeFormat.format(date));
  node.dateTime = date.toISOString();
  node.title = fullTimeFormat.format(date);
  return node;
}

function avatarClass(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `c${hash % AVATAR_COLOURS}`;
}

function initial(name) {
  const first = [...name.trim()][0];
  return first ? first.toUpperCase() : '?';
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KB', 'MB', 'GB'];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value >= 10 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

/** The server's download URL, if it is a same-origin /files/ path. */
function safeFileUrl(url) {
  try {
    const target = new URL(url, location.href);
    if (target.origin !== location.origin || !target.pathname.startsWith('/files/')) return null;
    return target.pathname;
  } catch {
    return null;
  }
}

// ---- the message list --------------------------------------------------------

function nearBottom() {
  const list = ui.messages;
  return list.scrollHeight - list.scrollTop - list.clientHeight < NEAR_BOTTOM_PX;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
  lastScrollTop = ui.messages.scrollTop;
  pinned = true;
  unseenBelow = 0;
  renderNewMarker();
}

/** Called whenever the list or anything in it changed size. */
function keepPinned() {
  if (pinned) scrollToBottom();
}

// Images load, uploads turn into file cards, the window or the typing line
// changes the list's height: whatever grows, a pinned reader stays pinned.
// The decision was made before the growth (`pinned`), never after it.
const resizeWatcher = typeof ResizeObserver === 'function' ? new ResizeObserver(keepPinned) : null;
resizeWatcher?.observe(ui.messages);

function renderNewMarker() {
  ui.newMessages.hidden = unseenBelow === 0;
  ui.newMessages.textContent = unseenBelow === 1 ? '1 new message ↓' : `${unseenBelow} new messages ↓`;
}

function append(item) {
  const news = !item.classList.contains('system');
  ui.messages.append(item);
  regroup(item);
  resizeWatcher?.observe(item);
  if (pinned || item.classList.contains('own')) {
    scrollToBottom();
  } else if (news) {
    unseenBelow++;
    renderNewMarker();
  }
  if (document.hidden && news) {
    unread++;
    updateTitle();
  }
}

function systemLine(text, kind = 'info', at = Date.now()) {
  const item = el('li', `system ${kind}`);
  item.append(el('span', 'system-text', text), timeElement(at));
  append(item);
  return item;
}

/** Whether `item` continues the group of `previous` (same author, close in time). */
function continues(previous, item) {
  if (!previous || !previous.classList.contains('msg') || !item.classList.contains('msg')) return false;
  if (previous.classList.contains('lobby') || item.classList.contains('lobby')) return false;
  if (previous.dataset.user !== item.dataset.user) return false;
  if (previous.classList.contains('own') !== item.classList.contains('own')) return false;
  const gap = Number(item.dataset.time) - Number(previous.dataset.time);
  return Number.isFinite(gap) && gap >= 0 && gap < GROUP_WINDOW_MS;
}

/** Groups `item` with its neighbours after it was put in the list. */
function regroup(item) {
  item.classList.toggle('cont', continues(item.previousElementSibling, item));
  const next = item.nextElementSibling;
  if (next) next.classList.toggle('cont', continues(item, next));
}

/** A message bubble: avatar, name, time (when known), then `body`. */
function bubble({ user, timestamp, own, lobby, extraClass }) {
  const item = el('li', `msg${own ? ' own' : ''}${extraClass ? ` ${extraClass}` : ''}`);
  item.dataset.user = user;
  item.dataset.time = typeof timestamp === 'number' ? String(timestamp) : '';
  if (lobby) item.classList.add('lobby');
  const avatar = el('div', `avatar ${avatarClass(user)}`, initial(user));
  avatar.setAttribute('aria-hidden', 'true');
  const body = el('div', 'bubble');
  const meta = el('div', 'meta');
  meta.append(el('span', 'author', user));
  if (lobby) meta.append(el('span', 'badge', 'lobby'));
  const time = typeof timestamp === 'number' ? timeElement(timestamp) : el('time', 'time');
  meta.append(time);
  const state = el('span', 'state');
  meta.append(state);
  body.append(meta);
  item.append(avatar, body);
  return { item, body, time, state };
}

function textMessage({ user, text, timestamp, own = false, lobby = false }) {
  const parts = bubble({ user, timestamp, own, lobby });
  parts.body.append(el('p', 'text', text));
  append(parts.item);
  return parts;
}

function fileCard({ name, size, mimeType, url }) {
  const card = el('div', 'file-card');
  const href = safeFileUrl(url);
  // Only the image types the server serves as images (not SVG, which it
  // serves as a download) are previewed.
  if (href && /^image\/(png|jpeg|gif|webp|avif|bmp)$/i.test(mimeType)) {
    const thumbLink = el('a', 'thumb');
    thumbLink.href = href;
    thumbLink.download = name;
    thumbLink.setAttribute('aria-label', `Download image ${name}`);
    const img = el('img');
    img.src = href;
    img.alt = name;
    img.loading = 'lazy';
    img.decoding = 'async';
    // Where ResizeObserver is missing, the load is the moment it grew.
    img.addEventListener('load', keepPinned);
    thumbLink.append(img);
    card.append(thumbLink);
  }
  const row = el('div', 'file-row');
  row.append(fileIcon());
  const info = el('div', 'file-info');
  if (href) {
    const link = el('a', 'file-name', name);
    link.href = href;
    link.download = name;
    link.title = `Download ${name}`;
    info.append(link);
  } else {
    info.append(el('span', 'file-name', name));
  }
  info.append(el('span', 'file-size', formatSize(size)));
  row.append(info);
  card.append(row);
  return card;
}

function fileIcon() {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('class', 'file-icon');
  const path = document.createElementNS(ns, 'path');
  path.setAttribute('d', 'M6 2h8l6 6v12a2 2 0 0 1-2 2H6a2 2 0 0 1-2-2V4a2 2 0 0 1 2-2zm7 1.5V9h5.5L13 3.5z');
  svg.append(path);
  return svg;
}

function fileMessage(detail, own) {
  const parts = bubble({ user: own ? me : detail.user, timestamp: Date.now(), own, extraClass: 'file' });
  parts.body.append(fileCard(detail));
  append(parts.item);
  if (own && detail.fileId) ownFiles.set(detail.fileId, parts.item);
}

// ---- room history --------------------------------------------------------------
//
// Room messages carry their place in the room's stream (`offset`, within an
// `epoch`). The page puts each one in its place by offset, whether it comes
// live, replayed after a reconnect, or from history, and shows each offset
// once. Messages older than the page's join go above the "You joined" line;
// newer ones go at the end, above own messages still waiting for their ✓.

function offsetKey(epoch, offset) {
  return `${epoch}:${offset}`;
}

function isOffsetItem(node, epoch) {
  return node.dataset.epoch === epoch && node.dataset.offset !== undefined && node.dataset.offset !== '';
}

/** Marks an item as the room message at `offset` of `epoch`. */
function markOffset(item, epoch, offset) {
  item.dataset.epoch = epoch;
  item.dataset.offset = String(offset);
  shown.set(offsetKey(epoch, offset), item);
}

/** The first own message on the page still waiting for its ✓, in list order. */
function firstPendingOwn() {
  let first = null;
  for (const parts of ownPending.values()) {
    const item = parts.item;
    if (!item.isConnected) continue;
    if (first === null || item.compareDocumentPosition(first) & Node.DOCUMENT_POSITION_FOLLOWING) first = item;
  }
  return first;
}

/** Puts a room message item where its offset says. */
function insertByOffset(item, epoch, offset) {
  for (const node of ui.messages.children) {
    if (isOffsetItem(node, epoch) && Number(node.dataset.offset) > offset) {
      ui.messages.insertBefore(item, node);
      return;
    }
  }
  if (joinAnchor && joinAnchor.item.isConnected && joinAnchor.epoch === epoch && offset <= joinAnchor.offset) {
    ui.messages.insertBefore(item, joinAnchor.item);
    return;
  }
  const pending = firstPendingOwn();
  if (pending) ui.messages.insertBefore(item, pending);
  else ui.messages.append(item);
}

/** The first item the reader sees, and where it is, to keep it still while the list changes above it. */
function readingPosition() {
  const top = ui.messages.getBoundingClientRect().top;
  for (const node of ui.messages.children) {
    // The loading line comes and goes at the top; it is no landmark.
    if (node === edgeLine) continue;
    const rect = node.getBoundingClientRect();
    if (rect.bottom > top) return { node, at: rect.top - top };
  }
  return null;
}

function restoreReading(position) {
  if (!position || !position.node.isConnected) return;
  const top = ui.messages.getBoundingClientRect().top;
  const moved = position.node.getBoundingClientRect().top - top - position.at;
  if (moved !== 0) ui.messages.scrollTop += moved;
  lastScrollTop = ui.messages.scrollTop;
}

/**
 * The item for a room message (`message` or `fileShared` detail) from
 * `source`: 'live', 'missed' (replayed after a reconnect) or 'history'; null
 * when it is on the page already. Not yet in the list.
 */
function roomItem(detail, source) {
  const placed = typeof detail.offset === 'number' && typeof detail.epoch === 'string';
  if (placed && shown.has(offsetKey(detail.epoch, detail.offset))) return null;
  if (source !== 'live') {
    // Our own: still waiting for its ✓ (which will come), or a file card we show already.
    if (detail.clientMsgId && ownPending.has(detail.clientMsgId)) return null;
    const card = detail.type === 'fileShared' ? ownFiles.get(detail.fileId) : undefined;
    if (card) {
      if (placed && !card.dataset.offset) markOffset(card, detail.epoch, detail.offset);
      return null;
    }
  }
  const own = source !== 'live' && me !== null && detail.user === me;
  const file = detail.type === 'fileShared';
  let timestamp = detail.timestamp;
  if (typeof timestamp !== 'number') timestamp = source === 'live' ? Date.now() : null;
  const parts = bubble({ user: detail.user, timestamp, own, extraClass: file ? 'file' : undefined });
  parts.body.append(file ? fileCard(detail) : el('p', 'text', detail.text));
  if (own) {
    parts.item.classList.add('delivered');
    markDelivered(parts.state);
  }
  if (source !== 'live') parts.item.classList.add(source);
  if (placed) markOffset(parts.item, detail.epoch, detail.offset);
  return parts.item;
}

/** Puts a room message item in its place in the list (by offset when it has one). */
function placeItem(item) {
  if (item.dataset.offset) insertByOffset(item, item.dataset.epoch, Number(item.dataset.offset));
  else ui.messages.append(item);
  regroup(item);
  resizeWatcher?.observe(item);
}

/**
 * Shows a room message from `source` (see roomItem) in its place, keeping
 * a reader at the bottom there and any other reader on what they read.
 * Returns the new item, or null when it is on the page already.
 */
function roomMessage(detail, source) {
  const item = roomItem(detail, source);
  if (!item) return null;
  const news = source !== 'history';
  const reading = pinned ? null : readingPosition();
  placeItem(item);
  if (pinned) {
    scrollToBottom();
  } else {
    restoreReading(reading);
    if (news) {
      unseenBelow++;
      renderNewMarker();
    }
  }
  if (document.hidden && news) {
    unread++;
    updateTitle();
  }
  return item;
}

/** The ✓ on an own message: what is known is that the server accepted it. */
function markDelivered(state) {
  state.textContent = '✓';
  state.title = DELIVERED;
  state.setAttribute('aria-label', DELIVERED);
}

/** The "while you were away" line, above `item`; there is one, at the latest boundary. */
function markAway(item, note) {
  for (const old of ui.messages.querySelectorAll('.system.away')) old.remove();
  const line = el('li', 'system away');
  line.setAttribute('role', 'separator');
  line.append(el('span', 'system-text', 'While you were away'));
  if (note) line.append(el('span', 'away-note', note));
  ui.messages.insertBefore(line, item);
}

/** The newest and oldest offsets the page shows in `epoch`. */
function shownRange(epoch) {
  let newest = null;
  let oldest = null;
  for (const key of shown.keys()) {
    const at = key.lastIndexOf(':');
    if (key.slice(0, at) !== epoch) continue;
    const offset = Number(key.slice(at + 1));
    if (newest === null || offset > newest) newest = offset;
    if (oldest === null || offset < oldest) oldest = offset;
  }
  return { newest, oldest };
}

/** The line at the top of the list: loading, the room's beginning, or nothing. */
function renderEdge() {
  let text = null;
  if (loadingEarlier) text = 'Loading earlier messages…';
  else if (hasEarlier === false && shown.size > 0) text = `This is the beginning of #${currentRoom}`;
  if (text === null) {
    edgeLine?.remove();
    edgeLine = null;
    return;
  }
  if (!edgeLine) {
    edgeLine = el('li', 'system edge');
    edgeLine.append(el('span', 'system-text'));
  }
  edgeLine.firstChild.textContent = text;
  if (ui.messages.firstElementChild !== edgeLine) ui.messages.prepend(edgeLine);
}

/** Asks for history; null when the room changed meanwhile, or the server keeps none. */
async function fetchHistory(options) {
  const token = historyToken;
  const room = currentRoom;
  let result;
  try {
    result = await client.history(options);
  } catch {
    // A server without history, or the page left the room.
    return null;
  }
  if (token !== historyToken || room !== currentRoom || result.room !== room || typeof result.epoch !== 'string') return null;
  return result;
}

/** Entering a room: its last messages, so a reload or a new tab is not an empty room. */
async function loadLatest() {
  const result = await fetchHistory({ limit: HISTORY_PAGE });
  if (!result) return;
  if (roomEpoch === null) roomEpoch = result.epoch;
  if (result.epoch !== roomEpoch) return;
  hasEarlier = result.hasMore;
  for (const detail of result.messages) roomMessage(detail, 'history');
  renderEdge();
  keepPinned();
  fillView();
}

/** The reader is near the top: the messages before the oldest shown. */
async function loadEarlier() {
  if (loadingEarlier || hasEarlier !== true || !currentRoom || roomEpoch === null) return;
  const { oldest } = shownRange(roomEpoch);
  if (oldest === null || oldest <= 1) {
    hasEarlier = false;
    renderEdge();
    return;
  }
  loadingEarlier = true;
  const epoch = roomEpoch;
  let reading = readingPosition();
  renderEdge();
  restoreReading(reading);
  const result = await fetchHistory({ before: oldest, limit: HISTORY_PAGE });
  loadingEarlier = false;
  reading = readingPosition();
  if (result && result.epoch === epoch) {
    hasEarlier = result.hasMore;
    for (const detail of result.messages) {
      const item = roomItem(detail, 'history');
      if (item) placeItem(item);
    }
  }
  renderEdge();
  // The reader stays on what they were reading; the earlier messages are above it.
  if (pinned && !canScroll()) scrollToBottom();
  else restoreReading(reading);
  fillView();
}

function canScroll() {
  return ui.messages.scrollHeight > ui.messages.clientHeight + 1;
}

/** A list too short to scroll cannot be scrolled to the top: load earlier ones until it can. */
function fillView() {
  if (hasEarlier === true && !canScroll()) loadEarlier();
}

/**
 * After a reconnection the server could not replay what was missed (too
 * much of it, or the room's history was lost): show the room's latest
 * messages after what the page shows, and say how many in between are not
 * shown.
 */
async function catchUp({ epochChanged, previous }) {
  const before = epochChanged ? { newest: null } : shownRange(previous.epoch);
  const result = await fetchHistory({ limit: HISTORY_PAGE });
  if (!result) return;
  if (result.epoch !== roomEpoch) {
    // A new stream: its offsets start again and go after everything shown.
    roomEpoch = result.epoch;
    joinAnchor = null;
    hasEarlier = null;
  }
  let first = null;
  for (const detail of result.messages) {
    if (before.newest !== null && detail.offset <= before.newest) continue;
    const item = roomMessage(detail, 'missed');
    if (item && first === null) first = item;
  }
  if (first) {
    const skipped = before.newest !== null ? Number(first.dataset.offset) - before.newest - 1 : 0;
    const note = skipped > 0 ? `${skipped} earlier ${skipped === 1 ? 'message is' : 'messages are'} not shown` : null;
    markAway(first, note);
    keepPinned();
  }
}

/**
 * The server restarted the room's stream (`resync`): in a cluster, the
 * room's history was lost, or this page's node could not give it everything
 * it missed. What the page shows may no longer match the room, so it starts
 * over as on entering the room: the shown messages go (own messages still
 * waiting for their ✓, and uploads under way, stay), a "History restarted"
 * line takes the place of "You joined", and the room's last messages are
 * fetched to go above it. Live messages, newer than `offset`, go below it.
 */
function restartHistory(epoch, offset) {
  const kept = new Set([...ownPending.values()].map((parts) => parts.item));
  for (const upload of uploads.values()) kept.add(upload.item);
  for (const node of [...ui.messages.children]) {
    if (kept.has(node)) continue;
    resizeWatcher?.unobserve(node);
    node.remove();
  }
  shown.clear();
  ownFiles.clear();
  hasEarlier = null;
  loadingEarlier = false;
  // A history answer on its way is of the old stream.
  historyToken++;
  awayPending = false;
  edgeLine = null;
  const line = el('li', 'system warn restarted');
  line.append(el('span', 'system-text', 'History restarted'), timeElement(Date.now()));
  ui.messages.prepend(line);
  roomEpoch = epoch;
  joinAnchor = { item: line, epoch, offset };
  scrollToBottom();
  loadLatest();
}

function clearMessages() {
  if (resizeWatcher) {
    resizeWatcher.disconnect();
    resizeWatcher.observe(ui.messages);
  }
  ui.messages.replaceChildren();
  ownPending.clear();
  shown.clear();
  ownFiles.clear();
  roomEpoch = null;
  joinAnchor = null;
  hasEarlier = null;
  loadingEarlier = false;
  historyToken++;
  awayPending = false;
  edgeLine = null;
  uploads.clear();
  for (const timer of typists.values()) clearTimeout(timer);
  typists.clear();
  renderTyping();
  for (const timer of pendingLeaves.values()) clearTimeout(timer);
  pendingLeaves.clear();
  present.clear();
  returnWindow = { until: 0, count: 0 };
  pinned = true;
  lastScrollTop = 0;
  unseenBelow = 0;
  renderNewMarker();
}

// ---- typing ------------------------------------------------------------------

function someoneTyping(user) {
  clearTimeout(typists.get(user));
  typists.set(
    user,
    setTimeout(() => {
      typists.delete(user);
      renderTyping();
    }, TYPING_VISIBLE_MS),
  );
  renderTyping();
}

function stoppedTyping(user) {
  if (!typists.has(user)) return;
  clearTimeout(typists.get(user));
  typists.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...typists.keys()];
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = 'Several people are typing…';
  ui.typing.textContent = text;
}

// ---- connection state --------------------------------------------------------

function renderStatus() {
  const state = client.state;
  const attempt = client.attempt;
  const max = client.maxAttempts;
  const of = Number.isFinite(max) ? ` of ${max}` : '';
  let text;
  let look;
  switch (state) {
    case 'open':
      text = 'Connected';
      look = 'online';
      break;
    case 'reconnecting': {
      const seconds = Math.max(0, Math.ceil((client.nextRetryAt - Date.now()) / 1000));
      text = `Reconnecting in ${seconds} s (attempt ${attempt}${of})`;
      look = 'pending';
      break;
    }
    case 'connecting':
      text = attempt > 0 ? `Reconnecting now (attempt ${attempt}${of})` : 'Connecting…';
      look = 'pending';
      break;
    case 'offline':
      text = 'Offline';
      look = 'offline';
      break;
    default:
      text = 'Disconnected';
      look = 'offline';
  }
  const queued = client.queued;
  if (state !== 'open' && queued > 0) text += ` · ${queued} queued`;
  ui.connText.textContent = text;
  ui.conn.dataset.state = look;
  if (state !== announcedState) {
    announcedState = state;
    const spoken = { open: 'Connected', reconnecting: 'Connection lost, reconnecting', offline: 'Offline' };
    if (spoken[state]) ui.connAnnounce.textContent = spoken[state];
  }
  ui.retry.hidden = !(state === 'reconnecting' || state === 'offline');
  const rtt = client.latency;
  ui.latency.textContent = state === 'open' && rtt !== null ? `${Math.max(1, Math.round(rtt))} ms` : '';
  ui.latency.hidden = ui.latency.textContent === '';
  for (const parts of ownPending.values()) parts.state.textContent = state === 'open' ? 'Sending…' : 'Queued';
  if (state === 'reconnecting' && statusTicker === null) {
    statusTicker = setInterval(renderStatus, 500);
  } else if (state !== 'reconnecting' && statusTicker !== null) {
    clearInterval(statusTicker);
    statusTicker = null;
  }
}

function renderCount(count) {
  if (typeof count !== 'number') return;
  lastCount = count;
  ui.chatCount.textContent = count === 1 ? '1 person here' : `${count} people here`;
  ui.chatCount.removeAttribute('title');
  delete ui.chatCount.dataset.stale;
}

/** Offline, the page cannot know who is here: say so until the rejoin answers. */
function renderCountUnknown() {
  if (ui.chatCount.dataset.stale) return;
  countBeforeLoss = lastCount;
  lastCount = null;
  ui.chatCount.textContent = '? people here';
  ui.chatCount.title = 'Not known while offline; updated once the page has reconnected';
  ui.chatCount.dataset.stale = 'true';
}

function updateTitle() {
  const base = currentRoom ? `#${currentRoom} · Hubbub` : 'Hubbub';
  document.title = unread > 0 ? `(${unread}) ${base}` : base;
}

// ---- views -------------------------------------------------------------------

function enterRoom(room, count, joined) {
  if (currentRoom !== room) clearMessages();
  currentRoom = room;
  ui.chatRoom.textContent = room;
  ui.joinView.hidden = true;
  ui.chatView.hidden = false;
  ui.message.placeholder = `Message #${room}`;
  renderCount(count);
  const line = systemLine(`You joined #${room} as ${me}`, 'ok');
  if (typeof joined?.epoch === 'string') {
    roomEpoch = joined.epoch;
    joinAnchor = { item: line, epoch: joined.epoch, offset: joined.offset ?? 0 };
  }
  updateTitle();
  stopRoomRefresh();
  ui.message.focus();
  loadLatest();
}

function showJoin() {
  currentRoom = null;
  clearMessages();
  ui.chatView.hidden = true;
  ui.joinView.hidden = false;
  ui.joinError.hidden = true;
  updateTitle();
  refreshRooms();
  startRoomRefresh();
  ui.room.focus();
  ui.room.select();
}

function showJoinError(message) {
  ui.joinError.textContent = message;
  ui.joinError.hidden = false;
}

async function refreshRooms() {
  let rooms;
  try {
    const response = await fetch('/api/rooms', { cache: 'no-store' });
    if (!response.ok) return;
    rooms = await response.json();
  } catch {
    return;
  }
  if (!Array.isArray(rooms)) return;
  rooms.sort((a, b) => b.userCount - a.userCount || String(a.name).localeCompare(String(b.name)));
  const options = rooms.map((r) => {
    const option = document.createElement('option');
    option.value = String(r.name);
    option.label = r.userCount === 1 ? '1 person' : `${r.userCount} people`;
    return option;
  });
  ui.roomList.replaceChildren(...options);
  const chips = rooms.slice(0, MAX_ROOM_CHIPS).map((r) => {
    const li = el('li');
    const chip = el('button', 'chip');
    chip.type = 'button';
    chip.append(el('span', 'chip-name', `#${r.name}`), el('span', 'chip-count', String(r.userCount)));
    chip.setAttribute('aria-label', `Room ${r.name}, ${r.userCount} ${r.userCount === 1 ? 'person' : 'people'}`);
    chip.addEventListener('click', () => {
      ui.room.value = String(r.name);
      if (ui.username.value.trim() === '') ui.username.focus();
      else ui.joinForm.requestSubmit();
    });
    li.append(chip);
    return li;
  });
  ui.roomChips.replaceChildren(...chips);
  ui.activeRooms.hidden = chips.length === 0;
}

function startRoomRefresh() {
  stopRoomRefresh();
  roomsTimer = setInterval(() => {
    if (!document.hidden) refreshRooms();
  }, ROOMS_REFRESH_MS);
}

function stopRoomRefresh() {
  clearInterval(roomsTimer);
  roomsTimer = null;
}

// ---- sending -----------------------------------------------------------------

function sendMessage() {
  const text = ui.message.value;
  if (text.trim() === '') return;
  let clientMsgId;
  try {
    clientMsgId = client.sendMessage(text);
  } catch (err) {
    systemLine(err.message, 'error');
    return;
  }
  const parts = textMessage({ user: me, text, timestamp: Date.now(), own: true });
  parts.item.classList.add('pending');
  parts.state.textContent = client.state === 'open' ? 'Sending…' : 'Queued';
  ownPending.set(clientMsgId, parts);
  ui.message.value = '';
}

function shareFiles(files) {
  if (!currentRoom) return;
  for (const file of files) {
    client.sendFile(file).catch(() => {
      // The fileFailed event already shows why.
    });
  }
}

function uploadItem(detail) {
  const parts = bubble({ user: me, timestamp: Date.now(), own: true, extraClass: 'file uploading' });
  const card = el('div', 'file-card');
  const row = el('div', 'file-row');
  row.append(fileIcon());
  const info = el('div', 'file-info');
  info.append(el('span', 'file-name', detail.name), el('span', 'file-size', formatSize(detail.size)));
  row.append(info);
  const progress = el('progress', 'upload-progress');
  progress.max = Math.max(detail.size, 1);
  progress.value = 0;
  progress.setAttribute('aria-label', `Uploading ${detail.name}`);
  const note = el('span', 'upload-note', 'Waiting…');
  card.append(row, progress, note);
  parts.body.append(card);
  append(parts.item);
  uploads.set(detail.transferId, { ...parts, card, progress, note });
}

// ---- client events -----------------------------------------------------------

for (const type of ['stateChange', 'reconnecting', 'queueChange', 'latency', 'gaveUp', 'connected']) {
  client.addEventListener(type, renderStatus);
}

client.on('disconnected', ({ wasConnected }) => {
  expectOwnJoin = true;
  if (currentRoom) renderCountUnknown();
  if (wasConnected && currentRoom && !announcedLoss) {
    systemLine('Connection lost. Reconnecting…', 'warn');
    announcedLoss = true;
  }
});

client.on('connected', ({ restored }) => {
  if (restored && currentRoom && announcedLoss) systemLine('Reconnected', 'ok');
  announcedLoss = false;
  if (restored && currentRoom && countBeforeLoss !== null) {
    // Those who were here come back too (after a server restart, all at
    // once): their joins are not news for a while.
    returnWindow = { until: performance.now() + LEAVE_GRACE_MS, count: countBeforeLoss };
  }
});

client.on('gaveUp', () => {
  if (currentRoom) systemLine('Could not reach the server. Use “Retry now” to try again.', 'error');
});

client.on('usernameSet', ({ username }) => {
  me = username;
});

client.on('roomJoined', ({ room, userCount, restored, recovered, missed }) => {
  if (room !== currentRoom) return;
  renderCount(userCount);
  // Back in the room after the link was lost: what was said meanwhile
  // follows, and the first of it gets the "while you were away" line.
  awayPending = Boolean(restored && recovered && missed > 0);
});

client.on('recovered', () => {
  awayPending = false;
});

client.on('recoveryFailed', (detail) => {
  awayPending = false;
  if (detail.room !== currentRoom) return;
  catchUp(detail);
});

client.on('resync', ({ room, epoch, offset }) => {
  awayPending = false;
  if (room === currentRoom) restartHistory(epoch, offset);
});

client.on('userJoined', ({ user, room, userCount }) => {
  if (room !== currentRoom && room !== client.room) return;
  renderCount(userCount);
  if (user === me && expectOwnJoin) {
    expectOwnJoin = false;
    return;
  }
  if (!currentRoom) return;
  const leaving = pendingLeaves.get(user);
  if (leaving !== undefined) {
    clearTimeout(leaving);
    pendingLeaves.delete(user);
  }
  const returning =
    leaving !== undefined ||
    present.has(user) ||
    (performance.now() < returnWindow.until && userCount <= returnWindow.count);
  present.add(user);
  if (!returning) systemLine(`${user} joined`);
});

client.on('userLeft', ({ user, room, userCount }) => {
  if (!currentRoom || (room && room !== currentRoom)) return;
  renderCount(userCount);
  stoppedTyping(user);
  present.delete(user);
  clearTimeout(pendingLeaves.get(user));
  const at = Date.now();
  const show = () => {
    pendingLeaves.delete(user);
    systemLine(`${user} left`, 'info', at);
  };
  if (LEAVE_GRACE_MS === 0) show();
  else pendingLeaves.set(user, setTimeout(show, LEAVE_GRACE_MS));
});

client.on('userRenamed', ({ user, previous, room }) => {
  if (!currentRoom || (room && room !== currentRoom)) return;
  stoppedTyping(previous);
  present.delete(previous);
  present.add(user);
  systemLine(`${previous} is now ${user}`);
});

client.on('userTyping', ({ user }) => {
  if (!currentRoom) return;
  present.add(user);
  someoneTyping(user);
});

client.on('message', (detail) => {
  if (!currentRoom) return;
  present.add(detail.user);
  if (!detail.missed) stoppedTyping(detail.user);
  showRoomEvent(detail);
});

/** A live or replayed room message; the first replayed one marks where the reader was away. */
function showRoomEvent(detail) {
  const item = roomMessage(detail, detail.missed ? 'missed' : 'live');
  if (item && detail.missed && awayPending) {
    awayPending = false;
    markAway(item, null);
    keepPinned();
  }
}

client.on('lobbyChat', ({ user, text }) => {
  if (currentRoom) textMessage({ user, text, timestamp: Date.now(), lobby: true });
});

client.on('messageAcked', ({ clientMsgId, timestamp, offset, epoch }) => {
  const parts = ownPending.get(clientMsgId);
  if (!parts) return;
  ownPending.delete(clientMsgId);
  parts.item.classList.remove('pending');
  parts.item.classList.add('delivered');
  const date = new Date(timestamp);
  parts.time.textContent = timeFormat.format(date);
  parts.time.dateTime = date.toISOString();
  parts.time.title = fullTimeFormat.format(date);
  parts.item.dataset.time = String(timestamp);
  // The tick says what is known: the server accepted the message and passed
  // it on to the members connected then. It is not a read receipt.
  markDelivered(parts.state);
  if (typeof offset === 'number' && typeof epoch === 'string') {
    const other = shown.get(offsetKey(epoch, offset));
    if (other && other !== parts.item) {
      // History brought it in before the ✓ did: one copy is enough.
      other.remove();
    }
    markOffset(parts.item, epoch, offset);
    // Messages of others that the server took before this one go above it.
    for (const node of ui.messages.children) {
      if (node === parts.item) break;
      if (isOffsetItem(node, epoch) && Number(node.dataset.offset) > offset) {
        ui.messages.insertBefore(parts.item, node);
        break;
      }
    }
    regroup(parts.item);
  }
});

client.on('messageRejected', ({ clientMsgId, message }) => {
  const parts = ownPending.get(clientMsgId);
  if (!parts) return;
  ownPending.delete(clientMsgId);
  parts.item.classList.remove('pending');
  parts.item.classList.add('failed');
  parts.state.textContent = `Not sent: ${message}`;
});

client.on('error', ({ message, command }) => {
  // Refused messages and joins are shown where they happened; a server
  // without history refuses `history`, and the page simply shows none.
  if (['chatMessage', 'setUsername', 'joinRoom', 'file', 'history'].includes(command)) return;
  if (currentRoom) systemLine(message, 'error');
});

client.on('fileQueued', (detail) => {
  if (currentRoom) uploadItem(detail);
});

client.on('fileProgress', ({ transferId, sentBytes, size }) => {
  const upload = uploads.get(transferId);
  if (!upload) return;
  upload.progress.value = sentBytes;
  const percent = size > 0 ? Math.floor((sentBytes / size) * 100) : 100;
  upload.note.textContent = `Uploading… ${percent} %`;
});

client.on('fileSaved', (detail) => {
  const upload = uploads.get(detail.transferId);
  if (!upload) {
    if (currentRoom) fileMessage(detail, true);
    return;
  }
  uploads.delete(detail.transferId);
  upload.item.classList.remove('uploading');
  upload.card.replaceWith(fileCard(detail));
  if (detail.fileId) ownFiles.set(detail.fileId, upload.item);
  keepPinned();
});

client.on('fileFailed', ({ transferId, name, message }) => {
  const upload = uploads.get(transferId);
  if (!upload) {
    if (currentRoom) systemLine(`Could not share ${name}: ${message}`, 'error');
    return;
  }
  uploads.delete(transferId);
  upload.item.classList.remove('uploading');
  upload.item.classList.add('failed');
  upload.progress.remove();
  upload.note.textContent = `Not shared: ${message}`;
});

client.on('fileShared', (detail) => {
  if (!currentRoom) return;
  present.add(detail.user);
  if (!detail.missed) stoppedTyping(detail.user);
  showRoomEvent(detail);
});

// ---- page events -------------------------------------------------------------

ui.joinForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const username = ui.username.value.trim();
  const room = ui.room.value.trim();
  if (username === '') {
    showJoinError('Choose a username.');
    ui.username.focus();
    return;
  }
  if (room === '') {
    showJoinError('Choose a room, or type a new name to create one.');
    ui.room.focus();
    return;
  }
  ui.joinError.hidden = true;
  ui.joinButton.disabled = true;
  ui.joinButton.textContent = client.state === 'open' ? 'Joining…' : 'Waiting for the server…';
  expectOwnJoin = true;
  try {
    const [name, joined] = await Promise.all([client.setUsername(username), client.joinRoom(room)]);
    me = name;
    try {
      localStorage.setItem(USERNAME_KEY, name);
      localStorage.setItem(ROOM_KEY, joined.room);
    } catch {
      // Storage may be off (private mode); remembering is a convenience.
    }
    enterRoom(joined.room, joined.userCount, joined);
  } catch (err) {
    showJoinError(err.message);
  } finally {
    ui.joinButton.disabled = false;
    ui.joinButton.textContent = 'Join';
  }
});

ui.room.addEventListener('focus', refreshRooms);

ui.leaveButton.addEventListener('click', () => {
  client.leaveRoom().catch(() => {
    // Leaving while offline simply does not rejoin on reconnect.
  });
  try {
    localStorage.removeItem(ROOM_KEY);
  } catch {
    // No storage: nothing was remembered.
  }
  showJoin();
});

ui.messages.addEventListener(
  'scroll',
  () => {
    // Growth below never moves scrollTop up, so only the reader scrolling up
    // unpins; reaching the bottom again pins.
    const top = ui.messages.scrollTop;
    if (nearBottom()) {
      pinned = true;
      if (unseenBelow > 0) {
        unseenBelow = 0;
        renderNewMarker();
      }
    } else if (top < lastScrollTop) {
      pinned = false;
    }
    lastScrollTop = top;
    if (top < NEAR_TOP_PX) loadEarlier();
  },
  { passive: true },
);

ui.newMessages.addEventListener('click', () => {
  scrollToBottom();
  ui.messages.focus({ preventScroll: true });
});

ui.retry.addEventListener('click', () => client.reconnect());

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  sendMessage();
  ui.message.focus();
});

ui.message.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.message.addEventListener('input', () => {
  // The client sends at most one notice per couple of seconds.
  if (ui.message.value.trim() !== '') client.typing();
});

ui.message.addEventListener('paste', (event) => {
  const files = [...(event.clipboardData?.files ?? [])];
  if (files.length > 0) {
    event.preventDefault();
    shareFiles(files);
  }
});

ui.attachButton.addEventListener('click', () => ui.fileInput.click());

ui.fileInput.addEventListener('change', () => {
  shareFiles([...ui.fileInput.files]);
  ui.fileInput.value = '';
});

// Dropping files anywhere on the chat shares them; elsewhere, a drop must
// not make the browser navigate away to the file.
let dragDepth = 0;
const carriesFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes('Files');
window.addEventListener('dragenter', (event) => {
  if (!carriesFiles(event) || !currentRoom) return;
  dragDepth++;
  ui.dropOverlay.hidden = false;
});
window.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.dropOverlay.hidden = true;
});
window.addEventListener('dragover', (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = currentRoom ? 'copy' : 'none';
});
window.addEventListener('drop', (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  ui.dropOverlay.hidden = true;
  shareFiles([...event.dataTransfer.files]);
});

document.addEventListener('visibilitychange', () => {
  if (!document.hidden) {
    unread = 0;
    updateTitle();
  }
});

// ---- start -------------------------------------------------------------------

let rememberedRoom = null;
try {
  ui.username.value = localStorage.getItem(USERNAME_KEY) ?? '';
  rememberedRoom = localStorage.getItem(ROOM_KEY);
} catch {
  // No storage: start with an empty name.
}
const wantedRoom = query.get('room');
ui.room.value = wantedRoom || rememberedRoom || '';
renderStatus();
client.connect();
refreshRooms();
startRoomRefresh();
if (ui.username.value && rememberedRoom && ui.room.value === rememberedRoom) {
  // A reload (or a new tab) goes back to the room the page was in.
  ui.joinForm.requestSubmit();
} else {
  (ui.username.value ? ui.room : ui.username).focus();
}
