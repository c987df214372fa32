// End-to-end tests of the chat page and the browser client, in Debian's
// headless Chromium driven by playwright-core, against a real `hubbub` on
// loopback.
//
//   node web/tests/e2e.mjs http://127.0.0.1:PORT
//
// `cargo xtask browser` starts the server and runs this script. For the
// restart test it also passes, in the environment, E2E_SERVER_BIN (the binary),
// E2E_SERVER_PID (the running server, which this script kills) and
// E2E_UPLOAD_DIR; the script starts the replacement server itself, on the
// same address, and stops it when done. Screenshots go to E2E_ARTIFACTS
// (default target/browser-artifacts). Every wait is on a condition with a
// time limit; nothing sleeps. Exits non-zero if any test fails.
//
// E2E_WEB_DIR=web (optional) serves the page's files from that directory
// instead of the server's embedded copies, to try a change to the page
// without rebuilding the binary. `cargo xtask browser` never sets it.
// E2E_ONLY=REGEX (optional) runs only the tests whose names match.

import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const base = process.argv[2];
if (!base || !/^http:\/\/[^/]+$/.test(base)) {
  console.error('usage: node e2e.mjs http://127.0.0.1:PORT');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = path.resolve(process.env.E2E_ARTIFACTS ?? path.join(here, '../../target/browser-artifacts'));
/** Longest wait for any one condition. */
const WAIT = 10_000;
/** Longest time for one test. */
const TEST_LIMIT = 45_000;
/** Longest time for the whole run. */
const RUN_LIMIT = 240_000;
const XSS = '<img src=x onerror=alert(1)>';
/** The policy the page must work under (the server will send it later). */
const CSP = "default-src 'self'; img-src 'self' blob: data:";

mkdirSync(ARTIFACTS, { recursive: true });

/** Servers this script started (the restart test's), stopped on exit. */
const ownServers = new Set();
process.on('exit', () => {
  for (const child of ownServers) child.kill('SIGKILL');
});
setTimeout(() => {
  console.error(`browser tests: the run took longer than ${RUN_LIMIT / 1000} s; giving up`);
  process.exit(1);
}, RUN_LIMIT).unref();

// ---- harness -------------------------------------------------------------------

const tests = [];
/** E2E_ONLY=REGEX (optional) runs only the tests whose names match. */
const only = process.env.E2E_ONLY ? new RegExp(process.env.E2E_ONLY) : null;
function test(name, fn) {
  if (only === null || only.test(name)) tests.push({ name, fn });
}

class Skip extends Error {}

/** Runs `promise`, turning a failure into an error that says what was awaited. */
async function step(what, promise) {
  try {
    return await promise;
  } catch (err) {
    throw new Error(`${what}: ${firstLine(err.message)}`);
  }
}

function firstLine(text) {
  return String(text).split('\n')[0];
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

/** The pages a test opened, for failure screenshots and clean-up. */
let openContexts = [];

/** The page's files and their types, for E2E_WEB_DIR. */
const WEB_FILES = {
  '/': ['index.html', 'text/html; charset=utf-8'],
  '/client.js': ['client.js', 'text/javascript; charset=utf-8'],
  '/app.js': ['app.js', 'text/javascript; charset=utf-8'],
  '/style.css': ['style.css', 'text/css; charset=utf-8'],
};

/** A fresh browser context; with E2E_WEB_DIR, the page's files come from there. */
async function newContext(browser, options = {}) {
  const context = await browser.newContext(options);
  const dir = process.env.E2E_WEB_DIR;
  if (dir) {
    await context.route(
      (url) => url.origin === base && Object.hasOwn(WEB_FILES, url.pathname),
      (route) => {
        const [file, contentType] = WEB_FILES[new URL(route.request().url()).pathname];
        return route.fulfill({ status: 200, contentType, body: readFileSync(path.join(path.resolve(dir), file)) });
      },
    );
  }
  return context;
}

/**
 * Opens the chat page in a fresh browser context, checks that it is under
 * the strict Content-Security-Policy, and waits until the client is
 * connected. Dialogs
 * are recorded (and dismissed); uncaught page errors and CSP violations
 * fail the test.
 */
async function openPage(browser, label, options = {}, query = '', initScript = null) {
  const context = await newContext(browser, { viewport: { width: 1100, height: 760 }, ...options });
  const page = await context.newPage();
  if (initScript) await page.addInitScript(initScript);
  const record = { label, context, page, dialogs: [], errors: [] };
  openContexts.push(record);
  page.on('dialog', (dialog) => {
    record.dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  page.on('pageerror', (err) => record.errors.push(firstLine(err.message)));
  page.on('console', (msg) => {
    if (/Content Security Policy/i.test(msg.text())) record.errors.push(firstLine(msg.text()));
  });
  const response = await step(`${label}: load ${base}/${query}`, page.goto(`${base}/${query}`));
  const meta = await page.evaluate(() => document.querySelector('meta[http-equiv="Content-Security-Policy"]')?.content);
  assert(
    meta === CSP || response.headers()['content-security-policy'] === CSP,
    `${label}: the page is not under the policy ${CSP}`,
  );
  await waitForStatus(record, /^Connected/);
  return record;
}

function statusText(page) {
  return page.evaluate(() => document.getElementById('conn').textContent.replace(/\s+/g, ' ').trim());
}

async function waitForStatus(who, pattern, timeout = WAIT) {
  try {
    await who.page.waitForFunction(
      (source) => new RegExp(source).test(document.getElementById('conn-text').textContent),
      pattern.source,
      { timeout, polling: 50 },
    );
  } catch {
    throw new Error(`${who.label}: status never matched ${pattern} (it shows "${await statusText(who.page)}")`);
  }
}

async function join(who, username, room) {
  const { page } = who;
  await page.getByLabel('Username', { exact: true }).fill(username);
  await page.getByLabel('Room', { exact: true }).fill(room);
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await step(`${who.label}: chat view after joining ${room}`, page.locator('#chat-view').waitFor({ state: 'visible', timeout: WAIT }));
}

async function send(who, text) {
  const box = who.page.getByLabel('Message', { exact: true });
  await box.fill(text);
  await box.press('Enter');
}

/** How many message bodies in the list are exactly `text`. */
function countMessages(who, text) {
  return who.page.evaluate(
    (t) => [...document.querySelectorAll('#messages .msg .text')].filter((n) => n.textContent === t).length,
    text,
  );
}

async function waitForMessage(who, text, timeout = WAIT) {
  await step(
    `${who.label}: message ${JSON.stringify(text)} to appear`,
    who.page.waitForFunction(
      (t) => [...document.querySelectorAll('#messages .msg .text')].some((n) => n.textContent === t),
      text,
      { timeout, polling: 50 },
    ),
  );
}

async function waitForSystemLine(who, text, timeout = WAIT) {
  await step(
    `${who.label}: line ${JSON.stringify(text)}`,
    who.page.waitForFunction(
      (t) => [...document.querySelectorAll('#messages .system-text')].some((n) => n.textContent === t),
      text,
      { timeout, polling: 50 },
    ),
  );
}

async function waitForOwnDelivered(who, text) {
  await step(
    `${who.label}: own message ${JSON.stringify(text)} acknowledged`,
    who.page.waitForFunction(
      (t) => [...document.querySelectorAll('#messages .msg.own.delivered .text')].some((n) => n.textContent === t),
      text,
      { timeout: WAIT, polling: 50 },
    ),
  );
}

/**
 * Proves a message arrived exactly once: after it shows, a second message
 * from the same sender is awaited (the server keeps order, so any duplicate
 * would be in by then), then the first is counted.
 */
async function assertDeliveredOnce(sender, receiver, text) {
  await waitForMessage(receiver, text);
  const barrier = `barrier ${randomBytes(4).toString('hex')}`;
  await send(sender, barrier);
  await waitForMessage(receiver, barrier);
  const seen = await countMessages(receiver, text);
  assert(seen === 1, `${receiver.label} shows ${JSON.stringify(text)} ${seen} times, expected once`);
  const own = await countMessages(sender, text);
  assert(own === 1, `${sender.label} shows its own ${JSON.stringify(text)} ${own} times, expected once`);
}

/** The texts of the system lines (joins, leaves, connection notes) on a page. */
function systemLines(who) {
  return who.page.evaluate(() => [...document.querySelectorAll('#messages .system-text')].map((n) => n.textContent));
}

async function waitForCount(who, text, timeout = WAIT) {
  await step(
    `${who.label}: header count ${JSON.stringify(text)}`,
    who.page.waitForFunction((t) => document.getElementById('chat-count').textContent === t, text, { timeout, polling: 50 }),
  );
}

/** Waits until the message list is scrolled to its end (within 2 px). */
async function waitAtBottom(who, when) {
  const distance = () =>
    who.page.evaluate(() => {
      const list = document.getElementById('messages');
      return Math.round(list.scrollHeight - list.scrollTop - list.clientHeight);
    });
  try {
    await who.page.waitForFunction(
      () => {
        const list = document.getElementById('messages');
        return list.scrollHeight - list.scrollTop - list.clientHeight <= 2;
      },
      null,
      { timeout: 3000, polling: 50 },
    );
  } catch {
    throw new Error(`${who.label}: not at the bottom of the list ${when} (${await distance()} px above it)`);
  }
}

/** A PNG of `width` × `height` drawn in the page, as bytes. */
async function drawPng(who, width, height) {
  const bytes = await who.page.evaluate(
    async ([w, h]) => {
      const canvas = document.createElement('canvas');
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext('2d');
      ctx.fillStyle = '#0ea5e9';
      ctx.fillRect(0, 0, w, h);
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
      return [...new Uint8Array(await blob.arrayBuffer())];
    },
    [width, height],
  );
  return Buffer.from(bytes);
}

function uniqueRoom(prefix) {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

function sha256(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}

/** Downloads a server-relative URL in Node; returns the bytes and headers. */
async function download(url) {
  const response = await fetch(new URL(url, base));
  assert(response.ok, `GET ${url} answered ${response.status}`);
  return { bytes: Buffer.from(await response.arrayBuffer()), headers: response.headers };
}

async function fileLinkHref(who, name) {
  const link = who.page.locator('#messages a.file-name', { hasText: name });
  await step(`${who.label}: download link for ${name}`, link.first().waitFor({ state: 'visible', timeout: WAIT }));
  const links = await link.count();
  assert(links === 1, `${who.label} shows ${links} links for ${name}, expected one`);
  return link.getAttribute('href');
}

// ---- the tests -----------------------------------------------------------------

test('two pages chat: a message appears once on the other page, typing shows and clears', async (browser) => {
  const room = uniqueRoom('general');
  // A short grace period before a leave is shown, to keep the test short.
  const alice = await openPage(browser, 'alice', {}, '?leaveGrace=500');
  const bob = await openPage(browser, 'bob');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');
  await step(
    'alice: user count 2',
    alice.page.waitForFunction(() => document.getElementById('chat-count').textContent === '2 people here', null, {
      timeout: WAIT,
    }),
  );

  // Typing (key by key, as a person does) shows on the other page...
  const box = alice.page.getByLabel('Message', { exact: true });
  await box.pressSequentially('Hello Bob', { delay: 15 });
  await step(
    'bob: "alice is typing…"',
    bob.page.waitForFunction(() => document.getElementById('typing').textContent === 'alice is typing…', null, {
      timeout: WAIT,
    }),
  );
  // ...and clears by itself a few seconds after the typing stopped.
  const shownAt = Date.now();
  await step(
    'bob: typing indicator to clear',
    bob.page.waitForFunction(() => document.getElementById('typing').textContent === '', null, { timeout: 8000, polling: 50 }),
  );
  const clearedAfter = Date.now() - shownAt;
  assert(clearedAfter > 1000, `the typing indicator cleared after ${clearedAfter} ms, too soon to be read`);

  await box.press('Enter');
  await waitForOwnDelivered(alice, 'Hello Bob');
  await assertDeliveredOnce(alice, bob, 'Hello Bob');

  // The received message carries its sender's name and a time.
  const meta = await bob.page.evaluate(() => {
    const item = [...document.querySelectorAll('#messages .msg')].find((li) => li.querySelector('.text')?.textContent === 'Hello Bob');
    return { author: item?.querySelector('.author')?.textContent, time: item?.querySelector('time')?.textContent };
  });
  assert(meta.author === 'alice', `bob shows the author as ${JSON.stringify(meta.author)}`);
  assert(/\d/.test(meta.time ?? ''), `bob shows no time on the message (${JSON.stringify(meta.time)})`);

  // Leaving is a system line on the other page, with the new count.
  await bob.page.getByRole('button', { name: 'Leave room' }).click();
  await waitForSystemLine(alice, 'bob left');
});

/** An init script that keeps every WebSocket the page opens in `window.__sockets`. */
function recordSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
  };
}

test('compression: the chat page negotiates permessage-deflate and a long message arrives whole', async (browser) => {
  const room = uniqueRoom('deflate');
  const alice = await openPage(browser, 'alice', {}, '', recordSockets);
  const bob = await openPage(browser, 'bob', {}, '', recordSockets);
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  for (const who of [alice, bob]) {
    const extensions = await who.page.evaluate(() =>
      window.__sockets.filter((ws) => ws.readyState === WebSocket.OPEN).map((ws) => ws.extensions),
    );
    assert(
      extensions.length > 0 && extensions.every((e) => e.startsWith('permessage-deflate')),
      `${who.label}: the chat page's WebSocket negotiated ${JSON.stringify(extensions)}, not permessage-deflate`,
    );
  }
  // Longer than websocket.compression_min_bytes: it travels compressed both ways.
  const long = Array.from({ length: 12 }, (_, i) => `Part ${i} of a long message that travels compressed.`).join(' ');
  await send(alice, long);
  await waitForOwnDelivered(alice, long);
  await assertDeliveredOnce(alice, bob, long);
});

test('files: a picked file and a dropped image arrive as byte-identical downloads', async (browser) => {
  const room = uniqueRoom('files');
  const alice = await openPage(browser, 'alice');
  const bob = await openPage(browser, 'bob');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');

  // A binary file of several 64 KiB chunks, through the file picker.
  const data = randomBytes(300_000);
  await alice.page.setInputFiles('#file-input', { name: 'data set.bin', mimeType: 'application/octet-stream', buffer: data });
  const href = await fileLinkHref(bob, 'data set.bin');
  const got = await download(href);
  assert(got.bytes.equals(data), `the download of data set.bin differs (sha256 ${sha256(got.bytes)} vs ${sha256(data)})`);
  assert(/^attachment/.test(got.headers.get('content-disposition') ?? ''), 'the download is not served as an attachment');
  await fileLinkHref(alice, 'data set.bin');
  const sizeText = await bob.page.locator('#messages .file-size').first().textContent();
  assert(sizeText === '293 KB', `bob shows the size as ${JSON.stringify(sizeText)}`);

  // An image, dropped on the message list as a person drags one in.
  const png = await alice.page.evaluate(async () => {
    const canvas = document.createElement('canvas');
    canvas.width = 96;
    canvas.height = 64;
    const ctx = canvas.getContext('2d');
    const gradient = ctx.createLinearGradient(0, 0, 96, 64);
    gradient.addColorStop(0, '#4f46e5');
    gradient.addColorStop(1, '#db2777');
    ctx.fillStyle = gradient;
    ctx.fillRect(0, 0, 96, 64);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
    const file = new File([blob], 'sketch.png', { type: 'image/png' });
    const transfer = new DataTransfer();
    transfer.items.add(file);
    const target = document.getElementById('messages');
    for (const type of ['dragenter', 'dragover', 'drop']) {
      target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer }));
    }
    return [...new Uint8Array(await blob.arrayBuffer())];
  });
  const pngHref = await fileLinkHref(bob, 'sketch.png');
  const pngGot = await download(pngHref);
  assert(pngGot.bytes.equals(Buffer.from(png)), 'the download of sketch.png differs from the dropped file');
  await step(
    'bob: the image thumbnail to load',
    bob.page.waitForFunction(
      () => {
        const img = document.querySelector('#messages .thumb img[alt="sketch.png"]');
        return img && img.complete && img.naturalWidth === 96;
      },
      null,
      { timeout: WAIT, polling: 50 },
    ),
  );
  const overlayHidden = await alice.page.locator('#drop-overlay').isHidden();
  assert(overlayHidden, 'the drop overlay is still shown after the drop');
});

test('XSS payload as username, room and message is shown as text and runs nothing', async (browser) => {
  const yara = await openPage(browser, 'yara');
  const mallory = await openPage(browser, 'mallory');
  await join(yara, 'yara', XSS);
  await join(mallory, XSS, XSS);
  await waitForSystemLine(yara, `${XSS} joined`);
  await send(mallory, XSS);
  await waitForMessage(yara, XSS);
  const shown = await yara.page.evaluate(() => ({
    room: document.getElementById('chat-room').textContent,
    author: [...document.querySelectorAll('#messages .msg .author')].map((n) => n.textContent),
  }));
  assert(shown.room === XSS, `yara shows the room as ${JSON.stringify(shown.room)}`);
  assert(shown.author.includes(XSS), `yara shows the author as ${JSON.stringify(shown.author)}`);

  // The rooms list on a fresh page offers the room, as text.
  const visitor = await openPage(browser, 'visitor');
  await step(
    'visitor: the room among the active rooms',
    visitor.page.waitForFunction(
      (name) =>
        [...document.querySelectorAll('#room-chips .chip-name')].some((n) => n.textContent === `#${name}`) &&
        [...document.querySelectorAll('#room-list option')].some((o) => o.value === name),
      XSS,
      { timeout: WAIT, polling: 50 },
    ),
  );

  for (const who of [yara, mallory, visitor]) {
    const injected = await who.page.evaluate(() => document.querySelectorAll('img[src="x"], img[onerror]').length);
    assert(injected === 0, `${who.label}: the payload became ${injected} <img> element(s)`);
    assert(who.dialogs.length === 0, `${who.label}: a dialog fired: ${who.dialogs.join(', ')}`);
  }
});

test('an uploaded script never runs on the chat page, though the page allows scripts from its origin', async (browser) => {
  const eve = await openPage(browser, 'eve');
  const script = "window.__pwned = (window.__pwned ?? 0) + 1;";
  // Uploaded over the chat socket as JavaScript, the way any client may.
  const url = await step(
    'eve: upload a script with mimeType text/javascript',
    eve.page.evaluate(
      (body) =>
        new Promise((resolve, reject) => {
          const bytes = new TextEncoder().encode(body);
          const ws = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws/chat`);
          ws.onerror = () => reject(new Error('the upload socket failed'));
          ws.onmessage = (event) => {
            const msg = JSON.parse(event.data);
            if (msg.type === 'connected') {
              ws.send(JSON.stringify({ type: 'fileStart', name: 'evil.js', size: bytes.length, mimeType: 'text/javascript' }));
            } else if (msg.type === 'fileAccepted') {
              const frame = new Uint8Array(4 + bytes.length);
              frame.set(bytes, 4);
              ws.send(frame);
              ws.send(JSON.stringify({ type: 'fileEnd' }));
            } else if (msg.type === 'fileSaved') {
              ws.close();
              resolve(msg.url);
            } else if (msg.type === 'fileError' || msg.type === 'error') {
              reject(new Error(msg.message));
            }
          };
        }),
      script,
    ),
  );
  /** Adds `<script src>` to the page: 'load' if it ran, 'error' if the browser refused it. */
  const insert = (src) =>
    eve.page.evaluate(
      (s) =>
        new Promise((resolve) => {
          const tag = document.createElement('script');
          tag.src = s;
          tag.onload = () => resolve('load');
          tag.onerror = () => resolve('error');
          document.head.append(tag);
        }),
      src,
    );
  const pwned = () => eve.page.evaluate(() => window.__pwned ?? 0);

  // The same bytes served as JavaScript from this origin do run: the page's
  // policy allows it, so only the download's own headers can stop it.
  await eve.context.route(`${base}/e2e-control.js`, (route) =>
    route.fulfill({ status: 200, contentType: 'text/javascript', body: script }),
  );
  assert((await insert('/e2e-control.js')) === 'load', 'the control script did not load');
  assert((await pwned()) === 1, 'the control script did not run, so this test could not see a script run');

  assert((await insert(url)) === 'error', `${url} loaded as a script on the chat page`);
  assert((await pwned()) === 1, `${url} ran as a script on the chat page`);
  const headers = await eve.page.evaluate(async (u) => {
    const response = await fetch(u);
    return Object.fromEntries(['content-type', 'content-security-policy', 'cross-origin-resource-policy'].map((h) => [h, response.headers.get(h)]));
  }, url);
  assert(headers['content-type'] === 'application/octet-stream', `${url} is served as ${headers['content-type']}`);
  assert(/(^|;)\s*sandbox\b/.test(headers['content-security-policy'] ?? ''), `${url} has the policy ${headers['content-security-policy']}`);
  assert(headers['cross-origin-resource-policy'] === 'same-origin', `${url} has CORP ${headers['cross-origin-resource-policy']}`);
});

test('keyboard only: Tab and Enter join a room, send, attach and leave', async (browser) => {
  const room = uniqueRoom('keys');
  const peer = await openPage(browser, 'peer', {}, '?leaveGrace=500');
  await join(peer, 'peer', room);
  const kim = await openPage(browser, 'kim');
  const { page } = kim;
  const focused = () => page.evaluate(() => document.activeElement?.id ?? '');

  // The page starts in the Username field.
  assert((await focused()) === 'username', `focus starts on "${await focused()}", not the Username field`);
  await page.keyboard.type('kim');
  await page.keyboard.press('Tab');
  assert((await focused()) === 'room', `Tab from Username went to "${await focused()}", not Room`);
  await page.keyboard.type(room);
  await page.keyboard.press('Enter');
  await step('kim: chat view after Enter in Room', page.locator('#chat-view').waitFor({ state: 'visible', timeout: WAIT }));
  await step(
    'kim: focus in the Message field after joining',
    page.waitForFunction(() => document.activeElement?.id === 'message', null, { timeout: WAIT, polling: 50 }),
  );
  await page.keyboard.type('typed without a mouse');
  await page.keyboard.press('Enter');
  await waitForMessage(peer, 'typed without a mouse');

  // Tab reaches the Send button, Enter on it sends.
  await page.keyboard.type('sent with the Send button');
  await page.keyboard.press('Tab');
  assert((await focused()) === 'send-button', `Tab from Message went to "${await focused()}", not Send`);
  await page.keyboard.press('Enter');
  await waitForMessage(peer, 'sent with the Send button');
  assert((await focused()) === 'message', `after sending, focus is on "${await focused()}", not Message`);

  // Shift+Tab from the field reaches the named Attach button.
  await page.keyboard.press('Shift+Tab');
  assert((await focused()) === 'attach-button', `Shift+Tab went to "${await focused()}", not Attach file`);
  const attachName = await page.getByRole('button', { name: 'Attach file' }).count();
  assert(attachName === 1, 'no button is named "Attach file"');

  // And on to Leave room, which Enter activates.
  await page.keyboard.press('Shift+Tab');
  await page.keyboard.press('Shift+Tab');
  assert((await focused()) === 'leave-button', `Shift+Tab went to "${await focused()}", not Leave room`);
  await page.keyboard.press('Enter');
  await step('kim: join form after leaving', page.locator('#join-view').waitFor({ state: 'visible', timeout: WAIT }));
  assert((await focused()) === 'room', `after leaving, focus is on "${await focused()}", not Room`);
  await waitForSystemLine(peer, 'kim left');
});

test('screenshots at desktop and phone width', async (browser) => {
  const room = uniqueRoom('design');
  const ada = await openPage(browser, 'ada (desktop)', { viewport: { width: 1280, height: 800 } });
  await ada.page.screenshot({ path: path.join(ARTIFACTS, 'join-desktop.png') });
  await join(ada, 'ada', room);

  // The phone joins through the active-room button under the form.
  const phone = await openPage(browser, 'grace (phone)', {
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  await phone.page.getByLabel('Username', { exact: true }).fill('grace');
  const chip = phone.page.locator('#room-chips .chip', { hasText: `#${room}` });
  await step('grace (phone): the active room offered under the form', chip.waitFor({ state: 'visible', timeout: WAIT }));
  await phone.page.screenshot({ path: path.join(ARTIFACTS, 'join-phone.png') });
  await chip.click();
  await step('grace (phone): chat view after choosing the room', phone.page.locator('#chat-view').waitFor({ state: 'visible', timeout: WAIT }));
  await waitForSystemLine(ada, 'grace joined');
  const script = [
    [ada, 'Morning! Did the build go green overnight?'],
    [phone, 'It did: all checks passed, the browser tests too.'],
    [ada, 'Great. Sharing the release notes draft.'],
  ];
  for (const [who, text] of script) {
    await send(who, text);
    await waitForMessage(who === ada ? phone : ada, text);
  }
  await ada.page.setInputFiles('#file-input', {
    name: 'release-notes.md',
    mimeType: 'text/markdown',
    buffer: Buffer.from('# Release notes\n\n- Browser client\n- Chat page\n'),
  });
  await fileLinkHref(phone, 'release-notes.md');
  await send(phone, 'Looks good to me');
  await waitForMessage(ada, 'Looks good to me');
  // A third member who has not typed yet (servers pass on one typing notice
  // per member every couple of seconds), typing for the screenshots.
  const linus = await openPage(browser, 'linus');
  await join(linus, 'linus', room);
  await waitForSystemLine(ada, 'linus joined');
  await linus.page.getByLabel('Message', { exact: true }).pressSequentially('On it', { delay: 10 });
  for (const who of [ada, phone]) {
    await step(
      `${who.label}: typing indicator for the screenshot`,
      who.page.waitForFunction(() => document.getElementById('typing').textContent === 'linus is typing…', null, {
        timeout: WAIT,
        polling: 50,
      }),
    );
  }
  await ada.page.screenshot({ path: path.join(ARTIFACTS, 'chat-desktop.png') });
  await phone.page.screenshot({ path: path.join(ARTIFACTS, 'chat-phone.png') });

  const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `the phone layout scrolls sideways by ${overflow} px`);
  const composerVisible = await phone.page.locator('#send-button').isVisible();
  assert(composerVisible, 'the Send button is not visible at phone width');
});

test('scroll: a reader at the bottom stays there when an image arrives; one scrolled up gets a new-messages button', async (browser) => {
  const room = uniqueRoom('scroll');
  const alice = await openPage(browser, 'alice');
  const bob = await openPage(browser, 'bob', { viewport: { width: 900, height: 600 } });
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');
  for (let i = 1; i <= 20; i++) await send(alice, `filler ${i}`);
  await waitForMessage(bob, 'filler 20');
  const overflow = await bob.page.evaluate(() => {
    const list = document.getElementById('messages');
    return list.scrollHeight - list.clientHeight;
  });
  assert(overflow > 300, `bob's list overflows by only ${overflow} px; the test needs a full list`);
  await waitAtBottom(bob, 'after 20 messages');

  // The image is held back until its message is on bob's page, so it grows
  // the list after the page decided where to scroll, as on a slow link.
  let release;
  const held = new Promise((resolve) => {
    release = resolve;
  });
  await bob.page.route('**/files/**', async (route) => {
    await held;
    await route.continue();
  });
  await alice.page.setInputFiles('#file-input', { name: 'tall.png', mimeType: 'image/png', buffer: await drawPng(alice, 200, 400) });
  await fileLinkHref(bob, 'tall.png');
  await waitAtBottom(bob, 'when the image message arrived');
  release();
  await step(
    'bob: the image to load',
    bob.page.waitForFunction(
      () => {
        const img = document.querySelector('#messages .thumb img[alt="tall.png"]');
        return img && img.complete && img.naturalWidth === 200;
      },
      null,
      { timeout: WAIT, polling: 50 },
    ),
  );
  const grown = await bob.page.evaluate(() => document.querySelector('#messages .thumb img[alt="tall.png"]').getBoundingClientRect().height);
  assert(grown > 150, `the image is only ${grown} px high; it would not have moved the reader`);
  await waitAtBottom(bob, 'after the image loaded');
  await send(alice, 'after the image');
  await waitForMessage(bob, 'after the image');
  await waitAtBottom(bob, 'after a message that followed the image');
  await bob.page.screenshot({ path: path.join(ARTIFACTS, 'scroll-image-desktop.png') });

  // Bob scrolls up to read; what arrives then does not move him, and a
  // button says there is more below.
  await bob.page.locator('#messages').hover();
  await bob.page.mouse.wheel(0, -800);
  await step(
    'bob: scrolled up, and the scrolling over',
    bob.page.waitForFunction(
      () => {
        // A wheel may scroll smoothly: wait until two looks agree.
        const list = document.getElementById('messages');
        const settled = window.lastLook === list.scrollTop;
        window.lastLook = list.scrollTop;
        return settled && list.scrollHeight - list.scrollTop - list.clientHeight > 400;
      },
      null,
      { timeout: WAIT, polling: 100 },
    ),
  );
  const readingAt = await bob.page.evaluate(() => document.getElementById('messages').scrollTop);
  assert(await bob.page.locator('#new-messages').isHidden(), 'the new-messages button shows before anything new arrived');
  await send(alice, 'while bob reads older messages');
  await waitForMessage(bob, 'while bob reads older messages');
  const marker = bob.page.locator('#new-messages');
  await step('bob: the new-messages button', marker.waitFor({ state: 'visible', timeout: WAIT }));
  const label = await marker.textContent();
  assert(label === '1 new message ↓', `the button says ${JSON.stringify(label)}`);
  const stillAt = await bob.page.evaluate(() => document.getElementById('messages').scrollTop);
  assert(Math.abs(stillAt - readingAt) <= 1, `bob was moved from ${readingAt} to ${stillAt} while reading`);
  await bob.page.screenshot({ path: path.join(ARTIFACTS, 'new-messages-desktop.png') });
  await marker.click();
  await waitAtBottom(bob, 'after the new-messages button');
  await step('bob: the button hides once used', marker.waitFor({ state: 'hidden', timeout: WAIT }));
  await send(alice, 'and the reader is pinned again');
  await waitForMessage(bob, 'and the reader is pinned again');
  await waitAtBottom(bob, 'after the next message');
});

test('reload: the room is remembered and rejoined; a member back within the grace period is not shown leaving and joining', async (browser) => {
  const room = uniqueRoom('grace');
  const GRACE = 4000;
  const alice = await openPage(browser, 'alice', {}, `?leaveGrace=${GRACE}`);
  const bob = await openPage(browser, 'bob');
  const carol = await openPage(browser, 'carol');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await join(carol, 'carol', room);
  await waitForSystemLine(alice, 'carol joined');
  await waitForCount(alice, '3 people here');

  // Bob reloads: his page goes back to the room by itself, without the form.
  await bob.page.reload();
  await step(
    'bob: back in the room after the reload',
    bob.page.waitForFunction(
      (r) => !document.getElementById('chat-view').hidden && document.getElementById('chat-room').textContent === r,
      room,
      { timeout: WAIT, polling: 50 },
    ),
  );
  await waitForStatus(bob, /^Connected/);
  await send(bob, 'back after a reload');
  await waitForMessage(alice, 'back after a reload');

  // Carol leaves for good: the count drops at once, the line waits for the
  // grace period.
  const clicked = Date.now();
  await carol.page.getByRole('button', { name: 'Leave room' }).click();
  await waitForCount(alice, '2 people here');
  assert(!(await systemLines(alice)).includes('carol left'), 'alice shows "carol left" before the grace period ended');
  await waitForSystemLine(alice, 'carol left', GRACE + WAIT);
  const shownAfter = Date.now() - clicked;
  assert(shownAfter >= GRACE - 250, `"carol left" showed ${shownAfter} ms after she left, inside the ${GRACE} ms grace`);

  // Bob's leave came earlier with the same grace: had it been kept, it would
  // show by now.
  const lines = await systemLines(alice);
  assert(!lines.includes('bob left'), `alice shows "bob left" for a reload: ${JSON.stringify(lines)}`);
  const joins = lines.filter((line) => line === 'bob joined').length;
  assert(joins === 1, `alice shows "bob joined" ${joins} times, expected once: ${JSON.stringify(lines)}`);
  const remembered = await bob.page.evaluate(() => localStorage.getItem('hubbub.room'));
  assert(remembered === room, `bob's page remembers the room as ${JSON.stringify(remembered)}`);
});

test('a member\'s new name is shown: "dora is now dorothy"', async (browser) => {
  const room = uniqueRoom('names');
  const alice = await openPage(browser, 'alice');
  await join(alice, 'alice', room);
  const renamed = await alice.page.evaluate(async (room) => {
    // A second client, on its own, in the same page.
    const { HubbubClient } = await import('/client.js');
    const dora = new HubbubClient();
    dora.connect();
    await dora.setUsername('dora');
    await dora.joinRoom(room);
    await dora.setUsername('dorothy');
    window.dora = dora;
    return dora.username;
  }, room);
  assert(renamed === 'dorothy', `the rename was confirmed as ${JSON.stringify(renamed)}`);
  await waitForSystemLine(alice, 'dora is now dorothy');
  await alice.page.evaluate(() => window.dora.close());
});

test('client.js: backoff, bounded queue, dead-link detection, latency, upload resumed after a dropped link', async (browser) => {
  // The module on its own, in a page without the chat app.
  const context = await newContext(browser);
  const page = await context.newPage();
  const record = { label: 'module', context, page, dialogs: [], errors: [] };
  openContexts.push(record);
  page.on('pageerror', (err) => record.errors.push(firstLine(err.message)));
  const sockets = [];
  page.on('websocket', (ws) => {
    const socket = { url: ws.url(), text: [], binary: 0 };
    sockets.push(socket);
    ws.on('framesent', (frame) => {
      if (typeof frame.payload === 'string') socket.text.push(frame.payload);
      else socket.binary++;
    });
  });
  await page.goto(`${base}/health`);

  const delays = await page.evaluate(async () => {
    const { backoff, DEFAULTS } = await import('/client.js');
    const exact = { ...DEFAULTS.reconnect, jitter: 0 };
    return {
      plain: [1, 2, 3, 4, 5].map((n) => backoff(exact, n, 0.5)),
      capped: [3, 4, 9].map((n) => backoff({ ...exact, maxDelay: 5000 }, n, 0.5)),
      spread: [backoff(DEFAULTS.reconnect, 1, 0), backoff(DEFAULTS.reconnect, 1, 0.999999)],
      // Retrying for days: still the cap, never Infinity or NaN.
      late: [backoff(exact, 10_000, 0.5), backoff({ ...exact, initialDelay: 0 }, 10_000, 0.5)],
      maxAttempts: DEFAULTS.reconnect.maxAttempts,
    };
  });
  assert(delays.plain.join() === '1000,2000,4000,8000,16000', `backoff delays ${delays.plain}`);
  assert(delays.capped.join() === '4000,5000,5000', `capped backoff delays ${delays.capped}`);
  assert(delays.spread[0] === 800 && delays.spread[1] === 1200, `jittered first delay spans ${delays.spread}`);
  assert(delays.late.join() === '30000,0', `backoff after 10,000 attempts ${delays.late}`);
  assert(delays.maxAttempts === Infinity, `default attempts ${delays.maxAttempts}, not unlimited`);

  // A reconnect a minute away starts at once when the tab becomes visible
  // again (headless Chromium never hides a tab, so the page is told so).
  const wake = await page.evaluate(async () => {
    const { HubbubClient } = await import('/client.js');
    // Nothing listens on port 9: every attempt fails at once.
    const client = new HubbubClient('ws://127.0.0.1:9/', {
      reconnect: { initialDelay: 60_000, maxDelay: 60_000, jitter: 0 },
      heartbeat: false,
    });
    const scheduled = new Promise((resolve) => client.on('reconnecting', resolve));
    client.connect();
    const first = await scheduled;
    const started = performance.now();
    const attempt = new Promise((resolve) => {
      client.on('stateChange', ({ state }) => state === 'connecting' && resolve(performance.now() - started));
      setTimeout(() => resolve(null), 5000);
    });
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => 'visible' });
    document.dispatchEvent(new Event('visibilitychange'));
    const after = await attempt;
    delete document.visibilityState;
    client.close();
    return { delay: first.delay, after };
  });
  assert(wake.delay === 60_000, `the first reconnect was scheduled in ${wake.delay} ms`);
  assert(wake.after !== null && wake.after < 1000, `after visibilitychange the next attempt began after ${wake.after} ms`);

  const full = await page.evaluate(async () => {
    const { HubbubClient } = await import('/client.js');
    const client = new HubbubClient(undefined, { queueCapacity: 2 });
    client.joinRoom('never-connected').catch(() => {});
    client.sendMessage('one');
    client.sendMessage('two');
    try {
      client.sendMessage('three');
      return { thrown: false };
    } catch (err) {
      return { thrown: true, name: err.name, code: err.code, message: err.message, queued: client.queued };
    }
  });
  assert(full.thrown && full.code === 'queueFull' && full.queued === 2, `a full queue gave ${JSON.stringify(full)}`);
  assert(/queue is full/.test(full.message), `the queue-full error says ${JSON.stringify(full.message)}`);

  // /ws/echo sends every ping back as a ping, never a pong: a dead link.
  const dead = await page.evaluate(async () => {
    const { HubbubClient } = await import('/client.js');
    const client = new HubbubClient('/ws/echo', { heartbeat: { interval: 100, timeout: 300 }, reconnect: { maxAttempts: 0 } });
    const started = performance.now();
    const lost = new Promise((resolve) => client.on('disconnected', (d) => resolve({ ...d, after: performance.now() - started })));
    const gaveUp = new Promise((resolve) => client.on('gaveUp', resolve));
    client.connect();
    const result = await lost;
    await gaveUp;
    return { ...result, state: client.state };
  });
  assert(dead.reason === 'heartbeat timeout', `the silent link ended with ${JSON.stringify(dead)}`);
  assert(dead.after >= 300 && dead.after < 5000, `the dead link was found after ${Math.round(dead.after)} ms`);
  assert(dead.state === 'offline', `after giving up the state is ${dead.state}`);

  const latency = await page.evaluate(async () => {
    const { HubbubClient } = await import('/client.js');
    const client = new HubbubClient(undefined, { heartbeat: { interval: 100, timeout: 2000 } });
    let pongs = 0;
    const third = new Promise((resolve) => client.on('latency', (d) => ++pongs === 3 && resolve(d)));
    client.connect();
    const detail = await third;
    client.close();
    return { ...detail, latency: client.latency };
  });
  assert(latency.rtt >= 0 && latency.rtt < 1000 && latency.latency === latency.rtt, `latency ${JSON.stringify(latency)}`);
  assert(typeof latency.serverTime === 'number', 'the latency event has no serverTime');

  // An upload whose link drops after its first chunk continues with
  // fileResume on the new link and arrives intact.
  const room = uniqueRoom('resume');
  const upload = await page.evaluate(async (room) => {
    const { HubbubClient } = await import('/client.js');
    const client = new HubbubClient(undefined, { uploadHighWater: 64 * 1024 });
    client.connect();
    await client.setUsername('uploader');
    await client.joinRoom(room);
    const bytes = new Uint8Array(3 * 1024 * 1024);
    for (let at = 0; at < bytes.length; at += 65536) crypto.getRandomValues(bytes.subarray(at, at + 65536));
    let dropped = false;
    client.on('fileProgress', (p) => {
      if (!dropped && p.sentBytes > 0) {
        dropped = true;
        client.reconnect();
      }
    });
    const states = [];
    client.on('stateChange', ({ state }) => states.push(state));
    const saved = await client.sendFile(new File([bytes], 'big.bin', { type: 'application/octet-stream' }));
    const digest = await crypto.subtle.digest('SHA-256', bytes);
    client.close();
    const local = [...new Uint8Array(digest)].map((x) => x.toString(16).padStart(2, '0')).join('');
    return { saved, local, dropped, states, chunks: Math.ceil(bytes.length / 65536) };
  }, room);
  assert(upload.dropped, 'the link was never dropped during the upload');
  assert(upload.states.includes('reconnecting'), `states during the upload: ${upload.states}`);
  assert(upload.saved.sha256 === upload.local, `saved sha256 ${upload.saved.sha256}, local ${upload.local}`);
  const got = await download(upload.saved.url);
  assert(sha256(got.bytes) === upload.local, 'the downloaded big.bin differs from what was sent');
  const chat = sockets.filter((s) => s.url.endsWith('/ws/chat') && s.text.some((t) => t.includes('"uploader"')));
  const first = chat.find((s) => s.text.some((t) => t.includes('"fileStart"')));
  const resumed = chat.find((s) => s.text.some((t) => t.includes('"fileResume"')));
  assert(first && resumed && first !== resumed, 'the upload did not continue with fileResume on a new connection');
  assert(
    resumed.binary < upload.chunks && first.binary + resumed.binary >= upload.chunks,
    `chunks sent: ${first.binary} before the drop, ${resumed.binary} after, of ${upload.chunks}`,
  );
  const restoredFirst = resumed.text.findIndex((t) => t.includes('"setUsername"'));
  const resumeAt = resumed.text.findIndex((t) => t.includes('"fileResume"'));
  assert(restoredFirst >= 0 && restoredFirst < resumeAt, 'the session was not restored before the upload resumed');
});

/** The list as the reader sees it, top to bottom: message texts and system lines, with their classes. */
function listItems(who) {
  return who.page.evaluate(() =>
    [...document.querySelectorAll('#messages > li')].map((li) => ({
      text: li.classList.contains('system') ? li.querySelector('.system-text')?.textContent : li.querySelector('.text')?.textContent,
      system: li.classList.contains('system'),
      classes: li.className,
      offset: li.dataset.offset ?? null,
    })),
  );
}

/** Sends `texts` in order from a client of its own in `who`'s page, as `username`, each acknowledged before the next. */
async function sendFromModule(who, username, room, texts) {
  await step(
    `${who.label}: ${username} sends ${texts.length} messages`,
    who.page.evaluate(
      async ([username, room, texts]) => {
        const { HubbubClient } = await import('/client.js');
        const client = new HubbubClient(undefined, { heartbeat: false });
        client.connect();
        await client.setUsername(username);
        await client.joinRoom(room);
        // One at a time, so that a message the rate limit holds back does
        // not end up after later ones.
        for (const text of texts) {
          await new Promise((resolve) => {
            const id = client.sendMessage(text);
            const off = client.on('messageAcked', ({ clientMsgId }) => {
              if (clientMsgId !== id) return;
              off();
              resolve();
            });
          });
        }
        client.close();
      },
      [username, room, texts],
    ),
  );
}

test('client.js history: pages back to the first message; a reconnect replays what was missed, in order, once each', async (browser) => {
  const page = (await openPage(browser, 'module')).page;
  const room = uniqueRoom('module-history');
  const result = await page.evaluate(async (room) => {
    const { HubbubClient } = await import('/client.js');
    const quiet = { heartbeat: false, reconnect: { maxAttempts: 0 } };
    const writer = new HubbubClient(undefined, quiet);
    const reader = new HubbubClient(undefined, quiet);
    writer.connect();
    reader.connect();
    await writer.setUsername('writer');
    await reader.setUsername('reader');
    await writer.joinRoom(room);
    const joined = await reader.joinRoom(room);
    const sendAll = (texts) =>
      new Promise((resolve) => {
        const ids = new Set(texts.map((t) => writer.sendMessage(t)));
        const off = writer.on('messageAcked', ({ clientMsgId }) => {
          ids.delete(clientMsgId);
          if (ids.size === 0) {
            off();
            resolve();
          }
        });
      });
    const live = [];
    reader.on('message', (m) => live.push(m));
    await sendAll(['one', 'two', 'three', 'four', 'five']);
    while (live.length < 5) await new Promise((r) => reader.addEventListener('message', r, { once: true }));

    // history: the newest two, then back to the first.
    const newest = await reader.history({ limit: 2 });
    const pages = [newest.messages.map((m) => m.text)];
    let page = newest;
    while (page.hasMore) {
      page = await reader.history({ before: page.messages[0].offset, limit: 2 });
      pages.unshift(page.messages.map((m) => m.text));
    }
    let invalid = null;
    try {
      await reader.history({ limit: 500 });
    } catch (err) {
      invalid = err.code;
    }

    // The reader goes away; three messages are sent; it comes back.
    reader.close();
    await sendAll(['six', 'seven', 'eight']);
    const missed = [];
    const offMissed = reader.on('message', (m) => missed.push(m));
    const recovered = new Promise((resolve) => reader.on('recovered', resolve));
    const rejoined = new Promise((resolve) => reader.on('roomJoined', resolve));
    reader.connect();
    const rejoin = await rejoined;
    const done = await recovered;
    await sendAll(['nine']);
    while (missed.length < 4) await new Promise((r) => reader.addEventListener('message', r, { once: true }));
    offMissed();
    writer.close();
    reader.close();
    return {
      joinedOffset: joined.offset,
      epoch: joined.epoch,
      liveOffsets: live.slice(0, 5).map((m) => m.offset),
      pages,
      invalid,
      rejoin,
      done,
      missed: missed.map((m) => ({ text: m.text, missed: m.missed, offset: m.offset, epoch: m.epoch })),
    };
  }, room);
  assert(typeof result.epoch === 'string' && result.joinedOffset === 0, `the join said epoch ${result.epoch}, offset ${result.joinedOffset}`);
  assert(JSON.stringify(result.liveOffsets) === '[1,2,3,4,5]', `live offsets ${JSON.stringify(result.liveOffsets)}`);
  assert(
    JSON.stringify(result.pages) === JSON.stringify([['one'], ['two', 'three'], ['four', 'five']]),
    `history pages ${JSON.stringify(result.pages)}`,
  );
  assert(result.invalid === 'invalidValue', `history({limit: 500}) gave ${result.invalid}`);
  assert(result.rejoin.recovered === true && result.rejoin.missed === 3, `the rejoin said ${JSON.stringify(result.rejoin)}`);
  assert(result.done.missed === 3, `the recovered event said ${JSON.stringify(result.done)}`);
  const got = result.missed.map((m) => `${m.text}:${m.offset}:${m.missed}`).join(' ');
  assert(got === 'six:6:true seven:7:true eight:8:true nine:9:false', `after the reconnect the reader got ${got}`);
  assert(result.missed.every((m) => m.epoch === result.epoch), 'a replayed message has another epoch');
});

test('client.js urls: a dead first URL costs no backoff, a lost link moves to the next URL, and the backoff comes once per round', async (browser) => {
  const page = (await openPage(browser, 'module')).page;
  const result = await page.evaluate(async () => {
    const { HubbubClient } = await import('/client.js');
    const live = new URL('/ws/chat', location.href).href.replace(/^http/, 'ws');
    // The same server under another URL stands for a second node.
    const second = `${live}?node=2`;
    // Nodes that are down: paths the server refuses to upgrade (404), on
    // the page's origin, since the page's policy (connect-src 'self') holds
    // any other origin's socket until the connect timeout.
    const dead = ['/ws/down-1', '/ws/down-2'].map((path) => new URL(path, live).href);
    // A minute between rounds: any wait shows.
    const slow = { heartbeat: false, reconnect: { initialDelay: 60_000, maxDelay: 60_000, jitter: 0 } };
    const client = new HubbubClient(undefined, { ...slow, urls: [dead[0], live, second] });
    const seen = [];
    for (const type of ['connected', 'disconnected', 'reconnecting']) client.on(type, (d) => seen.push({ type, url: d.url ?? null }));
    const connectedTo = () => new Promise((resolve) => {
      const off = client.on('connected', (d) => {
        off();
        resolve(d.url);
      });
    });
    const started = performance.now();
    let connected = connectedTo();
    client.connect();
    const first = await connected;
    const firstAfter = performance.now() - started;
    // A lost link: the next connect goes to the next URL in the list.
    connected = connectedTo();
    client.reconnect();
    const second_ = await connected;
    const current = client.url;
    client.close();

    // Every URL down: both are tried at once, then one wait for the next round.
    const lonely = new HubbubClient(undefined, { ...slow, urls: dead });
    const failed = [];
    lonely.on('disconnected', (d) => failed.push(d.url));
    const scheduled = new Promise((resolve) => lonely.on('reconnecting', resolve));
    const t0 = performance.now();
    lonely.connect();
    const retry = await scheduled;
    const retryAfter = performance.now() - t0;
    const state = lonely.state;
    lonely.close();
    let invalid = null;
    try {
      new HubbubClient(undefined, { urls: 'ws://one-string/' });
    } catch (err) {
      invalid = err.code;
    }
    return { live, second, dead, first, firstAfter, second_, current, seen, failed, retry, retryAfter, state, invalid };
  });
  assert(result.first === result.live, `connected first to ${result.first}, not ${result.live}`);
  assert(result.firstAfter < 5000, `the dead first URL cost ${Math.round(result.firstAfter)} ms`);
  const before = result.seen.slice(0, result.seen.findIndex((e) => e.type === 'connected'));
  assert(
    JSON.stringify(before) === JSON.stringify([{ type: 'disconnected', url: result.dead[0] }]),
    `before connecting: ${JSON.stringify(before)}`,
  );
  assert(result.second_ === result.second && result.current === result.second, `after the lost link: ${result.second_} (url ${result.current})`);
  assert(JSON.stringify(result.failed) === JSON.stringify(result.dead), `the dead URLs tried: ${JSON.stringify(result.failed)}`);
  assert(result.retry.attempt === 1 && result.retry.delay === 60_000, `the next round: ${JSON.stringify(result.retry)}`);
  assert(result.retryAfter < 5000 && result.state === 'reconnecting', `the round took ${Math.round(result.retryAfter)} ms, state ${result.state}`);
  assert(result.invalid === 'invalidValue', `urls that are not an array gave ${result.invalid}`);
});

/**
 * An init script that keeps every WebSocket the page opens in
 * `window.__sockets`, so a test can hand the page a frame as if the server
 * had sent it (the server sends `resync` only in a cluster).
 */
function keepSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
  };
}

test('client.js resync: the position is replaced, the app is told, and the next join asks from the new position', async (browser) => {
  const page = (await openPage(browser, 'module', {}, '', keepSockets)).page;
  const room = uniqueRoom('module-resync');
  const result = await page.evaluate(async (room) => {
    const { HubbubClient } = await import('/client.js');
    const client = new HubbubClient(undefined, { heartbeat: false });
    const sent = [];
    client.connect();
    await client.setUsername('resyncer');
    const joined = await client.joinRoom(room);
    const socket = window.__sockets.at(-1);
    const hear = (msg) => socket.dispatchEvent(new MessageEvent('message', { data: JSON.stringify(msg) }));
    const told = new Promise((resolve) => client.on('resync', resolve));
    hear({ type: 'resync', room, epoch: 'restarted', offset: 7 });
    const resync = await told;
    const position = client.position(room);
    const got = [];
    client.on('message', (m) => got.push(`${m.text}:${m.offset}:${m.epoch}`));
    hear({ type: 'chatMessage', user: 'x', text: 'at the new offset', timestamp: 1, offset: 7 });
    hear({ type: 'chatMessage', user: 'x', text: 'above it', timestamp: 2, offset: 8 });
    // The next link's join: captured from its socket.
    const refused = new Promise((resolve) => client.on('recoveryFailed', resolve));
    const opened = new Promise((resolve) => client.on('stateChange', ({ state }) => state === 'connecting' && resolve()));
    client.reconnect();
    await opened;
    const next = window.__sockets.at(-1);
    const nativeSend = next.send.bind(next);
    next.send = (data) => {
      sent.push(JSON.parse(data));
      nativeSend(data);
    };
    const failed = await refused;
    client.close();
    return { joined, resync, position, got, rejoin: sent.find((m) => m.type === 'joinRoom'), failed };
  }, room);
  const { joined, resync } = result;
  assert(
    resync.room === room && resync.epoch === 'restarted' && resync.offset === 7 && resync.epochChanged === true,
    `the resync event said ${JSON.stringify(resync)}`,
  );
  assert(
    resync.previous?.epoch === joined.epoch && resync.previous?.offset === joined.offset,
    `the resync's previous position ${JSON.stringify(resync.previous)}, the join's ${joined.epoch}/${joined.offset}`,
  );
  assert(JSON.stringify(result.got) === JSON.stringify(['above it:8:restarted']), `after the resync the client delivered ${JSON.stringify(result.got)}`);
  assert(result.position.epoch === 'restarted' && result.position.offset === 7, `position right after the resync ${JSON.stringify(result.position)}`);
  assert(
    JSON.stringify(result.rejoin?.since) === JSON.stringify({ epoch: 'restarted', offset: 8 }),
    `the next join asked with ${JSON.stringify(result.rejoin)}`,
  );
  // The server does not know that epoch (it never restarted): it says so.
  assert(result.failed.previous.epoch === 'restarted' && result.failed.epochChanged, `recoveryFailed said ${JSON.stringify(result.failed)}`);
});

test('history: the page shows the room\'s last messages when entered and after a reload; scrolling up loads earlier ones', async (browser) => {
  const room = uniqueRoom('history');
  const alice = await openPage(browser, 'alice');
  await join(alice, 'alice', room);
  const texts = Array.from({ length: 75 }, (_, i) => `history ${i + 1}`);
  await sendFromModule(alice, 'dora', room, texts);
  await waitForMessage(alice, 'history 75');
  await send(alice, 'mine before the reload');
  await waitForOwnDelivered(alice, 'mine before the reload');

  // A reload brings back the room and what was said in it, own messages as own.
  await alice.page.reload();
  await waitForStatus(alice, /^Connected/);
  await waitForMessage(alice, 'mine before the reload');
  await waitForMessage(alice, 'history 75');
  const own = await alice.page.locator('#messages .msg.own.delivered .text', { hasText: 'mine before the reload' }).count();
  assert(own === 1, `after the reload alice's own message shows ${own} times as hers with a ✓`);

  // A newcomer sees the last 50, oldest first, above the line saying it joined.
  const bob = await openPage(browser, 'bob', { viewport: { width: 900, height: 600 } });
  await join(bob, 'bob', room);
  await waitForMessage(bob, 'history 27');
  const items = await listItems(bob);
  const messages = items.filter((i) => !i.system).map((i) => i.text);
  const expected = [...texts.slice(26), 'mine before the reload'];
  assert(JSON.stringify(messages) === JSON.stringify(expected), `bob first shows ${messages.length} messages: ${JSON.stringify(messages)}`);
  const joinedAt = items.findIndex((i) => i.text === `You joined #${room} as bob`);
  assert(joinedAt === items.length - 1, `"You joined" is not below the history: ${JSON.stringify(items.slice(-3))}`);
  await waitAtBottom(bob, 'after the history loaded');

  // Scrolling to the top loads earlier messages, without moving the reader,
  // until the first one and the line saying it is the beginning.
  /** Where the message `text` is, from the top of the list's visible area (px). */
  const placeOf = (text) =>
    bob.page.evaluate((t) => {
      const list = document.getElementById('messages');
      const item = [...list.querySelectorAll('.msg')].find((li) => li.querySelector('.text')?.textContent === t);
      return Math.round(item.getBoundingClientRect().top - list.getBoundingClientRect().top);
    }, text);
  for (let round = 0; round < 3; round++) {
    const { before, oldest } = await bob.page.evaluate(() => {
      const list = document.getElementById('messages');
      list.scrollTop = 0;
      const items = document.querySelectorAll('#messages .msg');
      return { before: items.length, oldest: items[0].querySelector('.text').textContent };
    });
    const wasAt = await placeOf(oldest);
    const loaded = await bob.page
      .waitForFunction(
        (n) => document.querySelectorAll('#messages .msg').length > n || /beginning/.test(document.querySelector('#messages .edge')?.textContent ?? ''),
        before,
        { timeout: WAIT, polling: 50 },
      )
      .then(() => true, () => false);
    assert(loaded, `bob: scrolling to the top loaded nothing (round ${round + 1})`);
    await step(
      `bob: ${JSON.stringify(oldest)} kept in place while earlier messages came in above it`,
      bob.page.waitForFunction(() => !/Loading/.test(document.querySelector('#messages .edge')?.textContent ?? ''), null, {
        timeout: WAIT,
        polling: 50,
      }),
    );
    const nowAt = await placeOf(oldest);
    assert(Math.abs(nowAt - wasAt) <= 2, `bob was reading ${JSON.stringify(oldest)} ${wasAt} px from the top; after the load it is at ${nowAt} px`);
    if (await bob.page.evaluate(() => /beginning/.test(document.querySelector('#messages .edge')?.textContent ?? ''))) break;
  }
  await waitForMessage(bob, 'history 1');
  await waitForSystemLine(bob, `This is the beginning of #${room}`);
  const all = (await listItems(bob)).filter((i) => !i.system).map((i) => i.text);
  assert(JSON.stringify(all) === JSON.stringify([...texts, 'mine before the reload']), `after scrolling up bob shows ${all.length} messages, not each once in order`);
  await bob.page.screenshot({ path: path.join(ARTIFACTS, 'history-top-desktop.png') });
});

test('recovery: a page offline while others wrote shows what it missed after it reconnects, once each, below "While you were away"', async (browser) => {
  const room = uniqueRoom('recover');
  const alice = await openPage(browser, 'alice');
  const bob = await openPage(browser, 'bob', {}, '?reconnectMaxDelay=500&leaveGrace=30000');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');
  await send(alice, 'said while bob was here');
  await waitForMessage(bob, 'said while bob was here');

  await bob.context.setOffline(true);
  await waitForStatus(bob, /^Reconnecting/);
  const missed = ['missed one', 'missed two', 'missed three'];
  for (const text of missed) {
    await send(alice, text);
    await waitForOwnDelivered(alice, text);
  }
  await bob.context.setOffline(false);
  await waitForStatus(bob, /^Connected/);
  await waitForMessage(bob, 'missed three');
  await assertDeliveredOnce(alice, bob, 'missed three');
  const items = await listItems(bob);
  for (const text of missed) {
    const n = items.filter((i) => !i.system && i.text === text).length;
    assert(n === 1, `bob shows ${JSON.stringify(text)} ${n} times after reconnecting`);
  }
  const away = items.findIndex((i) => i.system && i.text === 'While you were away');
  const first = items.findIndex((i) => i.text === 'missed one');
  const here = items.findIndex((i) => i.text === 'said while bob was here');
  assert(away >= 0, `bob shows no "While you were away" line: ${JSON.stringify(items.map((i) => i.text))}`);
  assert(here < away && away + 1 === first, `"While you were away" is not right above what bob missed: ${JSON.stringify(items.map((i) => i.text))}`);
  const order = items.filter((i) => !i.system).map((i) => i.text);
  const at = missed.map((t) => order.indexOf(t));
  assert(at[0] < at[1] && at[1] < at[2], `bob shows the missed messages out of order: ${JSON.stringify(order)}`);
  const marked = items.filter((i) => missed.includes(i.text) && /\bmissed\b/.test(i.classes)).length;
  assert(marked === 3, `${marked} of the missed messages are marked as missed`);
  await bob.page.screenshot({ path: path.join(ARTIFACTS, 'while-away-desktop.png') });
});

test('recovery refused: the page fetches the room\'s latest messages instead and shows each once', async (browser) => {
  const room = uniqueRoom('refused');
  const alice = await openPage(browser, 'alice');
  const bob = await openPage(browser, 'bob', {}, '?reconnectMaxDelay=500&leaveGrace=30000');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');
  await send(alice, 'before the gap');
  await waitForMessage(bob, 'before the gap');

  // Bob's page will rejoin with an epoch the server does not know, as after
  // a server that lost the room's history: it answers recovered: false.
  await bob.page.evaluate(() => {
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
      if (typeof data === 'string' && data.includes('"since"')) {
        const msg = JSON.parse(data);
        msg.since.epoch = 'not-this-room';
        data = JSON.stringify(msg);
      }
      return send.call(this, data);
    };
  });
  await bob.context.setOffline(true);
  await waitForStatus(bob, /^Reconnecting/);
  const missed = ['gap one', 'gap two'];
  for (const text of missed) {
    await send(alice, text);
    await waitForOwnDelivered(alice, text);
  }
  await bob.context.setOffline(false);
  await waitForStatus(bob, /^Connected/);
  await waitForMessage(bob, 'gap two');
  await assertDeliveredOnce(alice, bob, 'gap two');
  const items = await listItems(bob);
  const texts = items.map((i) => i.text);
  for (const text of ['before the gap', ...missed]) {
    const n = items.filter((i) => !i.system && i.text === text).length;
    assert(n === 1, `bob shows ${JSON.stringify(text)} ${n} times: ${JSON.stringify(texts)}`);
  }
  const away = texts.indexOf('While you were away');
  assert(away >= 0 && away + 1 === texts.indexOf('gap one'), `"While you were away" is not right above what bob missed: ${JSON.stringify(texts)}`);
});

test('resync: the page says the history restarted, shows the room\'s last messages above that line and live ones below', async (browser) => {
  const room = uniqueRoom('resync');
  // Dora comes and goes between her messages; her leaves are never shown.
  const alice = await openPage(browser, 'alice', {}, '?leaveGrace=60000', keepSockets);
  await join(alice, 'alice', room);
  await sendFromModule(alice, 'dora', room, ['one', 'two', 'three']);
  await waitForMessage(alice, 'three');
  await send(alice, 'mine');
  await waitForOwnDelivered(alice, 'mine');

  // The node could not give the page everything: a resync in the same
  // epoch, at the room's newest offset.
  const at = await alice.page.evaluate((room) => {
    const items = [...document.querySelectorAll('#messages [data-offset]')];
    const newest = items.reduce((a, b) => (Number(b.dataset.offset) > Number(a.dataset.offset) ? b : a));
    const resync = { type: 'resync', room, epoch: newest.dataset.epoch, offset: Number(newest.dataset.offset) };
    const socket = window.__sockets.filter((ws) => ws.readyState === WebSocket.OPEN).at(-1);
    socket.dispatchEvent(new MessageEvent('message', { data: JSON.stringify(resync) }));
    return resync;
  }, room);
  assert(at.offset === 4, `the room's newest offset was ${at.offset}, expected 4`);
  await waitForSystemLine(alice, 'History restarted');
  await waitForMessage(alice, 'mine');
  await waitForMessage(alice, 'three');
  await sendFromModule(alice, 'dora', room, ['four']);
  await waitForMessage(alice, 'four');
  const items = (await listItems(alice)).map((i) => i.text);
  const expected = [`This is the beginning of #${room}`, 'one', 'two', 'three', 'mine', 'History restarted', 'four'];
  assert(JSON.stringify(items) === JSON.stringify(expected), `after the resync alice shows ${JSON.stringify(items)}`);
  const own = await alice.page.locator('#messages .msg.own.delivered .text', { hasText: 'mine' }).count();
  assert(own === 1, `alice's own message shows ${own} times as hers with a ✓`);
});

test('server restart: the page shows reconnecting, rejoins, and a message sent offline arrives once', async (browser) => {
  const { E2E_SERVER_BIN: bin, E2E_UPLOAD_DIR: uploadDir } = process.env;
  if (!bin || !serverPid || !uploadDir) throw new Skip('needs E2E_SERVER_BIN, E2E_SERVER_PID and E2E_UPLOAD_DIR (cargo xtask browser sets them)');
  const room = uniqueRoom('restart');
  const alice = await openPage(browser, 'alice');
  const bob = await openPage(browser, 'bob');
  await join(alice, 'alice', room);
  await join(bob, 'bob', room);
  await waitForSystemLine(alice, 'bob joined');

  await killServer();
  await waitForStatus(alice, /^Reconnecting/);
  await waitForStatus(bob, /^Reconnecting/);
  await waitForSystemLine(alice, 'Connection lost. Reconnecting…');

  const offline = 'written while the server was down';
  await send(alice, offline);
  await waitForStatus(alice, /1 queued/);
  const queuedLabel = await alice.page.locator('#messages .msg.own.pending .state').last().textContent();
  assert(queuedLabel === 'Queued', `alice's offline message is labelled ${JSON.stringify(queuedLabel)}, not "Queued"`);
  await alice.page.screenshot({ path: path.join(ARTIFACTS, 'reconnecting-desktop.png') });

  // Alice's network stays down until Bob is back in the room, so the order
  // of the two reconnections, and what Bob can receive, is fixed.
  await alice.context.setOffline(true);
  await startServer(bin, new URL(base).host, uploadDir);
  await waitForStatus(bob, /^Connected/, 20_000);
  await waitForSystemLine(bob, 'Reconnected');
  await alice.context.setOffline(false);
  await waitForStatus(alice, /^Connected/, 20_000);
  await waitForSystemLine(alice, 'Reconnected');

  await waitForOwnDelivered(alice, offline);
  await assertDeliveredOnce(alice, bob, offline);
  const count = await bob.page.locator('#chat-count').textContent();
  assert(count === '2 people here', `bob shows "${count}" after the restart`);
});

test('server down longer than the old five attempts: the page keeps trying, shows the count as unknown, and tries at once when back online', async (browser) => {
  const { E2E_SERVER_BIN: bin, E2E_UPLOAD_DIR: uploadDir } = process.env;
  if (!bin || !serverPid || !uploadDir) throw new Skip('needs E2E_SERVER_BIN, E2E_SERVER_PID and E2E_UPLOAD_DIR (cargo xtask browser sets them)');
  const room = uniqueRoom('outage');
  // Alice retries at most 300 ms apart, so the old limit of five attempts
  // passes in a couple of seconds; Carol waits a minute between attempts.
  const alice = await openPage(browser, 'alice', {}, '?reconnectMaxDelay=300&leaveGrace=30000');
  const carol = await openPage(browser, 'carol', {}, '?reconnectDelay=60000&reconnectMaxDelay=60000');
  await join(alice, 'alice', room);
  await join(carol, 'carol', room);
  await waitForSystemLine(alice, 'carol joined');
  await waitForCount(alice, '2 people here');

  await killServer();
  for (const who of [alice, carol]) {
    await waitForCount(who, '? people here');
    const stale = await who.page.locator('#chat-count').getAttribute('data-stale');
    assert(stale === 'true', `${who.label}: the offline count is not marked stale`);
  }
  await waitForStatus(carol, /^Reconnecting in [3-6]\d s \(attempt 1\)/);
  await waitForStatus(alice, /\(attempt (?:[89]|\d{2,})\)/);
  const aliceLines = await systemLines(alice);
  assert(!aliceLines.some((line) => /Could not reach/.test(line)), `alice gave up: ${JSON.stringify(aliceLines)}`);
  await alice.page.screenshot({ path: path.join(ARTIFACTS, 'offline-count-desktop.png') });

  await startServer(bin, new URL(base).host, uploadDir);
  await waitForStatus(alice, /^Connected/);
  await waitForSystemLine(alice, 'Reconnected');
  await waitForCount(alice, '1 person here');

  // Carol's next attempt is most of a minute away; the browser saying the
  // network is back starts it now.
  await waitForStatus(carol, /^Reconnecting in [2-6]\d s/);
  await carol.context.setOffline(true);
  await step('carol: the browser is offline', carol.page.waitForFunction(() => !navigator.onLine, null, { timeout: WAIT, polling: 50 }));
  await carol.context.setOffline(false);
  await waitForStatus(carol, /^Connected/, 5000);
  await waitForCount(carol, '2 people here');
  await waitForCount(alice, '2 people here');

  // Carol was in the room before the outage: back, she is not news.
  await send(carol, 'back online');
  await waitForMessage(alice, 'back online');
  const joins = (await systemLines(alice)).filter((line) => line === 'carol joined').length;
  assert(joins === 1, `alice shows "carol joined" ${joins} times after the outage, expected once`);
});

/** The pid of the server the tests run against: xtask's, then the replacements'. */
let serverPid = Number(process.env.E2E_SERVER_PID) || null;

/** Kills the server and waits until its port refuses connections. */
async function killServer() {
  process.kill(serverPid, 'SIGKILL');
  const deadline = Date.now() + WAIT;
  for (;;) {
    try {
      await fetch(`${base}/health`, { signal: AbortSignal.timeout(1000) });
    } catch {
      return;
    }
    if (Date.now() > deadline) throw new Error(`the server (pid ${serverPid}) still answers after SIGKILL`);
    await new Promise((resolve) => setTimeout(resolve, 20)); // the polling interval
  }
}

/** Starts a replacement server on `host` and waits until it listens. */
async function startServer(bin, host, uploadDir) {
  const child = spawn(bin, ['--listen', host, '--upload-dir', uploadDir], { stdio: ['ignore', 'pipe', 'pipe'] });
  ownServers.add(child);
  serverPid = child.pid;
  const log = createWriteStream(path.join(ARTIFACTS, `server-restarted-${ownServers.size}.log`));
  child.stderr.pipe(log);
  const lines = createInterface({ input: child.stdout });
  const listening = new Promise((resolve, reject) => {
    lines.once('line', (line) => (line.includes(' listening on ') ? resolve() : reject(new Error(`unexpected first line: ${line}`))));
    child.once('exit', (code) => reject(new Error(`the restarted server exited with ${code}`)));
  });
  lines.on('line', (line) => log.write(`${line}\n`));
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('it did not listen within 10 s')), WAIT);
  });
  try {
    await step(`restarting the server on ${host}`, Promise.race([listening, limit]));
  } finally {
    clearTimeout(timer);
  }
}

// ---- run -----------------------------------------------------------------------

async function run() {
  const started = Date.now();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      // Pages served by a route count as public, and Chromium's Local
      // Network Access checks would then block their sockets to loopback.
      ...(process.env.E2E_WEB_DIR ? ['--disable-features=LocalNetworkAccessChecks'] : []),
    ],
  });
  console.log(`browser tests: Chromium ${browser.version()} against ${base}`);
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const [index, { name, fn }] of tests.entries()) {
    const t0 = Date.now();
    openContexts = [];
    let timer;
    try {
      const limit = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`took longer than ${TEST_LIMIT / 1000} s`)), TEST_LIMIT);
      });
      await Promise.race([fn(browser), limit]);
      for (const record of openContexts) {
        assert(record.errors.length === 0, `${record.label}: uncaught error in the page: ${record.errors.join('; ')}`);
      }
      passed++;
      console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (err) {
      if (err instanceof Skip) {
        skipped++;
        console.log(`skip ${name}: ${err.message}`);
      } else {
        failed++;
        console.log(`FAIL ${name}\n     ${err.message}`);
        for (const [i, record] of openContexts.entries()) {
          const file = path.join(ARTIFACTS, `failure-${index + 1}-${i + 1}.png`);
          await record.page.screenshot({ path: file }).catch(() => {});
          console.log(`     screenshot of ${record.label}: ${file}`);
        }
      }
    } finally {
      clearTimeout(timer);
      for (const record of openContexts) await record.context.close().catch(() => {});
    }
  }
  await browser.close();
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  console.log(`browser tests: screenshots in ${ARTIFACTS}`);
  console.log(`browser tests: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''} in ${seconds} s`);
  return failed === 0;
}

run().then(
  (ok) => process.exit(ok ? 0 : 1),
  (err) => {
    console.error(`browser tests: ${err.stack ?? err}`);
    process.exit(1);
  },
);
