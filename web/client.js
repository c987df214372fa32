// Hubbub's browser client: one chat connection that survives network trouble.
//
// An ES module with no dependencies. It speaks the Hubbub chat protocol (see
// docs/PROTOCOL.md) over a browser WebSocket and adds what the Rust client
// has: reconnection with capped exponential backoff and jitter (forever by
// default, and at once when the network or the tab comes back), session restore
// (username, then room) before anything queued is sent, a bounded offline
// queue, a `clientMsgId` on every chat message with resend until the server
// acknowledges it, de-duplication of received messages, an application-level
// heartbeat with latency, chunked, verified, resumable file uploads, and
// room history: it remembers where it is in each room's stream ({epoch,
// offset}), rejoins with `since` after a reconnect to get what it missed,
// and pages back through earlier messages with `history()`. Given several
// server URLs (a cluster's nodes), it moves to the next one whenever a
// connect fails or the link is lost, and backs off once per round through
// the list. docs/CLIENT-JS.md is the guide; every event is listed there.

/** The defaults of every option; see docs/CLIENT-JS.md. */
export const DEFAULTS = Object.freeze({
  /**
   * Chat endpoints to connect to, tried in turn (a cluster's nodes); null
   * for just the constructor's `url`. With both, `url` comes first.
   */
  urls: null,
  /**
   * Reconnection after the link is lost. The delays are the classic
   * tutorial's (1 s, doubling), but there is no attempt limit: a tab left
   * open for days must come back by itself. Set `maxAttempts: 5` for the
   * tutorial's giving up.
   */
  reconnect: Object.freeze({
    /** Delay before the first attempt, in ms. */
    initialDelay: 1000,
    /** Factor between one delay and the next. */
    multiplier: 2,
    /** Longest delay, in ms. */
    maxDelay: 30000,
    /** Attempts before giving up; `Infinity` retries forever, 0 never does. */
    maxAttempts: Infinity,
    /** Random spread of each delay, as a fraction of it (0 to 1). */
    jitter: 0.2,
  }),
  /** The application-level heartbeat (`ping`/`pong`); `false` turns it off. */
  heartbeat: Object.freeze({
    /** Time between pings, in ms. */
    interval: 25000,
    /** A ping unanswered this long (ms) means the link is dead. */
    timeout: 35000,
  }),
  /** Most chat messages held: waiting to be sent plus sent but not acknowledged. */
  queueCapacity: 1024,
  /** Most file uploads waiting, the active one included. */
  uploadQueue: 16,
  /** How many ids of received messages are remembered to drop duplicates. */
  seenMessageIds: 4096,
  /** Longest time (ms) for the WebSocket handshake. */
  connectTimeout: 10000,
  /** Longest time (ms) for the server to confirm the restored username and room. */
  restoreTimeout: 10000,
  /** Chunk size asked for in `fileStart`, in bytes (the protocol's maximum). */
  chunkSize: 65536,
  /** Uploads pause while more than this many bytes wait in the socket's buffer. */
  uploadHighWater: 1 << 20,
  /** Least time (ms) between two `typing` notices sent (servers drop closer ones). */
  typingInterval: 2000,
  /** Least time (ms) between two `fileProgress` events of one upload. */
  progressInterval: 100,
  /** Reconnect at once when the browser says the network is back (`online`). */
  reconnectOnOnline: true,
  /**
   * Drop the link at once when the browser says the network is gone
   * (`offline`), rather than wait for the heartbeat to find it dead: what
   * is sent meanwhile waits in the queue, and `online` reconnects.
   */
  dropOnOffline: true,
  /** Reconnect at once when the page becomes visible again (`visibilitychange`). */
  reconnectOnVisible: true,
  /** Limits checked before sending, so a mistake fails at the call. */
  limits: Object.freeze({ username: 32, room: 64, text: 4096 }),
});

/** An error from the client, with a stable `code` (see docs/CLIENT-JS.md). */
export class HubbubError extends Error {
  /**
   * @param {string} message what went wrong, for humans
   * @param {string} code a stable machine-readable code
   */
  constructor(message, code) {
    super(message);
    this.name = 'HubbubError';
    this.code = code;
  }
}

/** The link was lost while a request was waiting for its answer. */
const LINK_LOST = 'linkLost';

/** Ready-state of an open WebSocket. */
const OPEN = 1;

/**
 * A reconnecting Hubbub chat client. Listen with `addEventListener(type, e =>
 * e.detail)` or the shorter `on(type, detail => ...)`.
 */
export class HubbubClient extends EventTarget {
  /** The chat endpoints' ws:// or wss:// URLs, in the order they are tried; never empty. */
  #urls;
  /** The index in #urls of the URL the next connect goes to. */
  #nextUrl = 0;
  /** The URL of the current socket (or the last one tried). */
  #url;
  /**
   * Connects left in the current round: after a failed connect the next URL
   * is tried at once while some are left; the backoff delay comes only
   * before a new round.
   */
  #roundLeft = 0;
  /** The options, defaults filled in. */
  #options;
  /** The current socket, or null between connections. */
  #ws = null;
  /** Increases with every socket, so callbacks of an old one are ignored. */
  #generation = 0;
  /** idle | connecting | open | reconnecting | offline | closed. */
  #state = 'idle';
  /** The id the server gave this connection. */
  #clientId = null;
  /** True once the session is restored on the current socket. */
  #ready = false;
  /** True once a session was ever restored, so later ones are reconnections. */
  #everConnected = false;
  /** Reconnect attempts since the link was lost. */
  #attempt = 0;
  /** The pending reconnect timer and when it fires (ms since the epoch). */
  #retryTimer = null;
  #retryAt = 0;
  /** Handshake and restore deadlines of the current socket. */
  #connectTimer = null;
  #restoreTimer = null;
  /** Set by close(): no reconnecting. */
  #closedByUser = false;
  /** The session the application asked for. */
  #desired = { username: null, room: null };
  /** The session the server confirmed on the current socket. */
  #confirmed = { username: null, room: null };
  /** True while #sync() brings #confirmed in line with #desired. */
  #syncing = false;
  /** Promises of setUsername/joinRoom/leaveRoom calls: {field, value, resolve, reject}. */
  #sessionWaiters = [];
  /** Commands sent on this socket that await their answer, oldest first. */
  #pending = [];
  /** Chat messages not yet acknowledged, by clientMsgId, in send order. */
  #outbox = new Map();
  /** Ids of received messages, oldest first (a Set keeps insertion order). */
  #seen = new Set();
  /**
   * The heartbeat (rules in PROTOCOL.md#heartbeat): the ping awaiting its
   * pong as {token, sent (performance.now())}, or null; when the next ping
   * is due; the one timer, set to the next of the two deadlines.
   */
  #beatPing = null;
  #beatDue = 0;
  #beatTimer = null;
  /** The last heartbeat token; tokens are a counter, never a clock. */
  #beatToken = 0;
  /** Latency probes from ping() awaiting their pong: token -> sent. */
  #probes = new Map();
  /** The last probe token; probes count up from PROBE_BASE. */
  #probeToken = PROBE_BASE;
  /** The last measured round-trip time in ms, or null. */
  #latency = null;
  /**
   * Where this client is in each room's stream: room -> {epoch, offset}, the
   * offset being the newest room message delivered to the application (or
   * the room's newest at the join). Sent as `since` when joining the room
   * again, so the server replays what was missed.
   */
  #positions = new Map();
  /** The room whose messages this socket receives, with its epoch; or null. */
  #stream = null;
  /** A replay under way after a recovering join: {room, until} (the newest offset at the join). */
  #replay = null;
  /** history() calls waiting for the session to be restored: {resolve, reject}. */
  #readyWaiters = [];
  /** Upload jobs; the first is the active one. */
  #uploads = [];
  /** True while an upload job is running on the current socket. */
  #uploadRunning = false;
  /** The `online` and `visibilitychange` listeners, removed by close(). */
  #onOnline = null;
  #onOffline = null;
  #onVisible = null;
  /** When the last typing notice was sent (performance.now()), or -Infinity. */
  #lastTyping = -Infinity;

  /**
   * @param {string} [url] the chat endpoint; default `/ws/chat` on the page's
   *   host, unless `options.urls` lists the endpoints
   * @param {object} [options] see DEFAULTS
   */
  constructor(url, options = {}) {
    super();
    this.#options = mergeOptions(options);
    this.#urls = resolveUrls(url, this.#options.urls);
    this.#url = this.#urls[0];
  }

  // ---- state -------------------------------------------------------------

  /** idle | connecting | open | reconnecting | offline | closed. */
  get state() {
    return this.#state;
  }

  /** The URL of the current connection (or of the last one tried). */
  get url() {
    return this.#url;
  }

  /** The id the server gave the current connection, or null. */
  get clientId() {
    return this.#clientId;
  }

  /** The username asked for (confirmed once connected). */
  get username() {
    return this.#desired.username;
  }

  /** The room asked for (confirmed once connected), or null. */
  get room() {
    return this.#desired.room;
  }

  /** Chat messages waiting to be sent or acknowledged. */
  get queued() {
    return this.#outbox.size;
  }

  /** The last heartbeat round trip in ms, or null. */
  get latency() {
    return this.#latency;
  }

  /** The reconnect attempt under way or scheduled (0 when connected). */
  get attempt() {
    return this.#attempt;
  }

  /** The configured attempt limit (Infinity for unlimited). */
  get maxAttempts() {
    return this.#options.reconnect.maxAttempts;
  }

  /** When the next reconnect attempt starts (ms since the epoch), or 0. */
  get nextRetryAt() {
    return this.#retryTimer === null ? 0 : this.#retryAt;
  }

  /**
   * Subscribes to an event; returns a function that unsubscribes.
   * @param {string} type an event name
   * @param {(detail: any) => void} listener called with the event's detail
   */
  on(type, listener) {
    const handler = (event) => listener(event.detail);
    this.addEventListener(type, handler);
    return () => this.removeEventListener(type, handler);
  }

  // ---- connection --------------------------------------------------------

  /** Opens the connection (no-op when already connecting or connected). */
  connect() {
    if (this.#state === 'connecting' || this.#state === 'open') return this;
    this.#closedByUser = false;
    this.#attempt = 0;
    this.#listenForWake();
    this.#startRound();
    return this;
  }

  /**
   * Connects again now: replaces the current link if there is one (the
   * session is restored and unacknowledged messages and uploads continue on
   * the new one), skips the wait of a scheduled reconnect, or starts over
   * after the client gave up.
   */
  reconnect() {
    if (this.#state === 'open' || this.#state === 'connecting') {
      this.#drop(this.#generation, 'reconnect requested');
    }
    if (this.#state === 'reconnecting') {
      this.#startRound();
    } else if (this.#state === 'offline' || this.#state === 'idle' || this.#state === 'closed') {
      this.connect();
    }
    return this;
  }

  /**
   * Closes the connection for good (until connect()). Queued messages are
   * kept and sent after a later connect().
   */
  close(code = 1000, reason = '') {
    this.#closedByUser = true;
    const waiters = this.#sessionWaiters;
    this.#sessionWaiters = [];
    for (const w of waiters) w.reject(new HubbubError('The client was closed', 'closed'));
    const readyWaiters = this.#readyWaiters;
    this.#readyWaiters = [];
    for (const w of readyWaiters) w.reject(new HubbubError('The client was closed', 'closed'));
    this.#clearRetry();
    this.#stopListeningForWake();
    const ws = this.#ws;
    if (ws) {
      detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        // Already closing.
      }
      this.#lost(code, reason || 'closed by the client');
    } else {
      this.#setState('closed');
    }
  }

  /**
   * Listens for the moments a waiting reconnect should not wait: the browser
   * says the network is back, or the user comes back to the tab (browsers
   * throttle timers in hidden tabs, so the scheduled attempt may be late);
   * and for the browser saying the network is gone, when the link is.
   */
  #listenForWake() {
    const wake = () => {
      if (this.#state === 'reconnecting' || this.#state === 'offline') this.reconnect();
    };
    if (this.#options.reconnectOnOnline && !this.#onOnline && globalThis.addEventListener) {
      this.#onOnline = wake;
      globalThis.addEventListener('online', this.#onOnline);
    }
    if (this.#options.dropOnOffline && !this.#onOffline && globalThis.addEventListener) {
      this.#onOffline = () => {
        if (this.#state === 'open' || this.#state === 'connecting') this.#drop(this.#generation, 'the browser went offline');
      };
      globalThis.addEventListener('offline', this.#onOffline);
    }
    const doc = globalThis.document;
    if (this.#options.reconnectOnVisible && !this.#onVisible && doc?.addEventListener) {
      this.#onVisible = () => {
        if (doc.visibilityState === 'visible') wake();
      };
      doc.addEventListener('visibilitychange', this.#onVisible);
    }
  }

  #stopListeningForWake() {
    if (this.#onOnline) {
      globalThis.removeEventListener?.('online', this.#onOnline);
      this.#onOnline = null;
    }
    if (this.#onOffline) {
      globalThis.removeEventListener?.('offline', this.#onOffline);
      this.#onOffline = null;
    }
    if (this.#onVisible) {
      globalThis.document?.removeEventListener('visibilitychange', this.#onVisible);
      this.#onVisible = null;
    }
  }

  /** Starts a round: each URL once, in turn, from the next one, without waiting in between. */
  #startRound() {
    this.#roundLeft = this.#urls.length;
    this.#open();
  }

  /** Opens a socket to the next URL. */
  #open() {
    this.#clearRetry();
    const gen = ++this.#generation;
    this.#roundLeft--;
    this.#url = this.#urls[this.#nextUrl];
    this.#nextUrl = (this.#nextUrl + 1) % this.#urls.length;
    this.#setState('connecting');
    let ws;
    try {
      ws = new WebSocket(this.#url);
    } catch (err) {
      // A malformed URL cannot get better by retrying.
      this.#closedByUser = true;
      this.#emit('error', { message: `Cannot connect to ${this.#url}: ${err.message}`, code: 'badUrl' });
      this.#lost(1006, err.message);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#ws = ws;
    this.#connectTimer = setTimeout(() => this.#drop(gen, 'connect timeout'), this.#options.connectTimeout);
    ws.onopen = () => {
      if (gen !== this.#generation) return;
      clearTimeout(this.#connectTimer);
      this.#restoreTimer = setTimeout(() => this.#drop(gen, 'session restore timeout'), this.#options.restoreTimeout);
      this.#restore(gen);
    };
    ws.onmessage = (event) => {
      if (gen !== this.#generation) return;
      if (typeof event.data === 'string') this.#onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (gen !== this.#generation) return;
      this.#lost(event.code, event.reason || (event.code === 1006 ? 'connection lost' : ''));
    };
    ws.onerror = () => {
      // A close event always follows; it carries what there is to say.
    };
  }

  /** Gives up on the current socket without waiting for a close handshake. */
  #drop(gen, reason) {
    if (gen !== this.#generation || !this.#ws) return;
    const ws = this.#ws;
    detach(ws);
    try {
      ws.close(4000, reason);
    } catch {
      // Already closing.
    }
    this.#lost(1006, reason);
  }

  /** The socket is gone: tidy up, tell the application, schedule a retry. */
  #lost(code, reason) {
    const wasReady = this.#ready;
    this.#generation++;
    this.#ws = null;
    this.#ready = false;
    this.#clientId = null;
    this.#confirmed = { username: null, room: null };
    this.#stream = null;
    this.#replay = null;
    clearTimeout(this.#connectTimer);
    clearTimeout(this.#restoreTimer);
    this.#stopHeartbeat();
    const pending = this.#pending;
    this.#pending = [];
    for (const request of pending) request.reject(new HubbubError('The connection was lost', LINK_LOST));
    this.#emit('disconnected', { code, reason, wasConnected: wasReady, url: this.#url });
    if (this.#closedByUser) {
      this.#setState('closed');
      return;
    }
    if (!wasReady && this.#roundLeft > 0) {
      // That server did not answer (or not in time): the next one now.
      this.#open();
      return;
    }
    this.#scheduleRetry();
  }

  #scheduleRetry() {
    const policy = this.#options.reconnect;
    const next = this.#attempt + 1;
    if (next > policy.maxAttempts) {
      this.#setState('offline');
      this.#emit('gaveUp', { attempts: this.#attempt });
      return;
    }
    this.#attempt = next;
    const delay = backoff(policy, next, Math.random());
    this.#retryAt = Date.now() + delay;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#startRound();
    }, delay);
    this.#setState('reconnecting');
    this.#emit('reconnecting', { attempt: next, maxAttempts: policy.maxAttempts, delay, at: this.#retryAt });
  }

  #clearRetry() {
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit('stateChange', { state, attempt: this.#attempt, queued: this.#outbox.size });
  }

  /** After the socket opens: username, then room, then the queue. */
  async #restore(gen) {
    try {
      await this.#sync(gen);
    } catch (err) {
      if (err.code === LINK_LOST) return;
      throw err;
    }
    if (gen !== this.#generation) return;
    clearTimeout(this.#restoreTimer);
    const restored = this.#everConnected;
    this.#ready = true;
    this.#everConnected = true;
    this.#attempt = 0;
    this.#setState('open');
    this.#emit('connected', { clientId: this.#clientId, restored, url: this.#url });
    this.#startHeartbeat(gen);
    // The application may have asked for another name or room while the
    // restore was finishing: bring that in line too, then send the queue.
    this.#kick();
  }

  /** Resolves once the session is restored and in line with what was asked. */
  #whenReady() {
    if (this.#ready && !this.#syncing) return Promise.resolve();
    if (this.#closedByUser) return Promise.reject(new HubbubError('The client was closed', 'closed'));
    return new Promise((resolve, reject) => this.#readyWaiters.push({ resolve, reject }));
  }

  #wakeReadyWaiters() {
    if (!this.#ready || this.#syncing) return;
    const waiters = this.#readyWaiters;
    this.#readyWaiters = [];
    for (const w of waiters) w.resolve();
  }

  // ---- session -----------------------------------------------------------

  /**
   * Sets the username; resolves with the name the server stored. While
   * offline it is remembered and sent on connect.
   * @param {string} username
   * @returns {Promise<string>}
   */
  setUsername(username) {
    const name = checkName(username, 'username', this.#options.limits.username);
    return this.#wantSession('username', name);
  }

  /**
   * Joins a room (leaving the current one); resolves with `{room, userCount,
   * epoch, offset, recovered, missed}` once the server confirms. While
   * offline it is remembered and sent on connect, after the username. A room
   * this client was in before is joined with `since`, so what was said
   * meanwhile arrives first, as `message` and `fileShared` events with
   * `missed: true`.
   * @param {string} room
   * @returns {Promise<{room: string, userCount: number, epoch: ?string, offset: ?number, recovered: ?boolean, missed: ?number}>}
   */
  joinRoom(room) {
    const name = checkName(room, 'room name', this.#options.limits.room);
    return this.#wantSession('room', name);
  }

  /** Leaves the current room; resolves when the server confirms. */
  leaveRoom() {
    return this.#wantSession('room', null);
  }

  #wantSession(field, value) {
    const promise = new Promise((resolve, reject) => {
      // A request for another value of the same field supersedes older ones.
      this.#sessionWaiters = this.#sessionWaiters.filter((w) => {
        if (w.field !== field || w.value === value) return true;
        w.reject(new HubbubError(`Superseded by a newer ${field} request`, 'superseded'));
        return false;
      });
      this.#sessionWaiters.push({ field, value, resolve, reject });
    });
    this.#desired[field] = value;
    if (this.#ready) this.#kick();
    return promise;
  }

  #settle(field, value, result, error) {
    this.#sessionWaiters = this.#sessionWaiters.filter((w) => {
      if (w.field !== field || w.value !== value) return true;
      if (error) w.reject(error);
      else w.resolve(result);
      return false;
    });
  }

  /** Brings the server's view of the session in line, then sends what waits. */
  async #kick() {
    const gen = this.#generation;
    try {
      await this.#sync(gen);
    } catch (err) {
      if (err.code === LINK_LOST) return;
      throw err;
    }
    this.#flush();
    this.#wakeReadyWaiters();
  }

  /**
   * Sends setUsername / joinRoom / leaveRoom until the confirmed session
   * matches the desired one. Throws a linkLost error if the socket goes.
   */
  async #sync(gen) {
    if (this.#syncing) return;
    this.#syncing = true;
    try {
      for (;;) {
        if (gen !== this.#generation) throw new HubbubError('The connection was lost', LINK_LOST);
        const want = this.#desired;
        if (want.username !== null && want.username !== this.#confirmed.username) {
          const name = want.username;
          try {
            const reply = await this.#request({ type: 'setUsername', username: name }, 'setUsername');
            this.#confirmed.username = reply.username;
            if (this.#desired.username === name) this.#desired.username = reply.username;
            this.#settle('username', name, reply.username);
          } catch (err) {
            if (err.code === LINK_LOST) throw err;
            if (this.#desired.username === name) this.#desired.username = this.#confirmed.username;
            this.#settle('username', name, null, err);
          }
        } else if (want.room !== this.#confirmed.room) {
          const room = want.room;
          try {
            if (room === null) {
              await this.#request({ type: 'leaveRoom' }, 'leaveRoom');
              this.#confirmed.room = null;
              this.#settle('room', null, null);
            } else {
              const at = this.#positions.get(room);
              const since = at ? { since: { epoch: at.epoch, offset: at.offset } } : {};
              const reply = await this.#request({ type: 'joinRoom', room, ...since }, 'joinRoom');
              this.#confirmed.room = reply.room;
              if (this.#desired.room === room) this.#desired.room = reply.room;
              this.#settle('room', room, {
                room: reply.room,
                userCount: reply.userCount,
                epoch: reply.epoch ?? null,
                offset: reply.offset ?? null,
                recovered: reply.recovered ?? null,
                missed: reply.missed ?? null,
              });
            }
          } catch (err) {
            if (err.code === LINK_LOST) throw err;
            if (this.#desired.room === room) this.#desired.room = this.#confirmed.room;
            this.#settle('room', room, null, err);
          }
        } else {
          // Requests for what is already in effect (a leave while offline,
          // say) need no command; they are done.
          this.#settle('username', want.username, want.username);
          this.#settle('room', want.room, want.room === null ? null : { room: want.room, userCount: null });
          return;
        }
      }
    } finally {
      this.#syncing = false;
    }
  }

  // ---- messages ----------------------------------------------------------

  /**
   * Sends a chat message to the room; returns its clientMsgId. Queued while
   * offline and resent after a reconnect until the server acknowledges it.
   * @param {string} text
   * @returns {string} the message's clientMsgId
   * @throws {HubbubError} `queueFull`, `notInRoom` or `invalidValue`
   */
  sendMessage(text) {
    if (typeof text !== 'string' || text.trim() === '') {
      throw new HubbubError('Invalid message text: must not be empty', 'invalidValue');
    }
    if (countChars(text) > this.#options.limits.text) {
      throw new HubbubError(`Invalid message text: must be at most ${this.#options.limits.text} characters`, 'invalidValue');
    }
    if (this.#desired.room === null) {
      throw new HubbubError('Join a room before sending messages', 'notInRoom');
    }
    if (this.#outbox.size >= this.#options.queueCapacity) {
      throw new HubbubError(
        `The offline queue is full: ${this.#outbox.size} messages are waiting to be sent`,
        'queueFull',
      );
    }
    const clientMsgId = uuid();
    this.#outbox.set(clientMsgId, { text, sentOn: -1 });
    this.#emitQueue();
    if (this.#ready && !this.#syncing) this.#transmit(clientMsgId);
    return clientMsgId;
  }

  /**
   * Tells the room this user is typing. Call it on every keystroke: notices
   * are sent at most once per `typingInterval`, and dropped while offline.
   */
  typing() {
    if (!this.#ready || this.#confirmed.room === null) return;
    const now = performance.now();
    if (now - this.#lastTyping < this.#options.typingInterval) return;
    this.#lastTyping = now;
    this.#sendJson({ type: 'typing' });
  }

  /**
   * Sends the tutorial's lobby broadcast to every connected client; dropped
   * while offline.
   * @param {string} text
   */
  sendLobby(text) {
    if (typeof text !== 'string' || text.trim() === '' || countChars(text) > this.#options.limits.text) {
      throw new HubbubError('Invalid message text', 'invalidValue');
    }
    if (!this.#ready) throw new HubbubError('Not connected', 'offline');
    this.#sendJson({ type: 'chat', user: this.#confirmed.username ?? undefined, text });
  }

  /**
   * Measures the round trip now; the answer comes as a `latency` event. The
   * probe is not a heartbeat ping: it neither waits for nor moves the
   * heartbeat's schedule.
   */
  ping() {
    if (!this.#ready) return;
    const token = ++this.#probeToken;
    this.#probes.set(token, performance.now());
    this.#sendJson({ type: 'ping', timestamp: token });
  }

  /** Sends every queued message not yet sent on this socket, then uploads. */
  #flush() {
    if (!this.#ready || this.#syncing) return;
    for (const [id, entry] of this.#outbox) {
      if (entry.sentOn !== this.#generation) this.#transmit(id);
    }
    this.#pumpUploads();
  }

  #transmit(clientMsgId) {
    const entry = this.#outbox.get(clientMsgId);
    if (!entry) return;
    entry.sentOn = this.#generation;
    this.#request({ type: 'chatMessage', text: entry.text, clientMsgId }, 'chatMessage', clientMsgId).then(
      (ack) => {
        // A replay may have shown that the server had it already.
        if (this.#outbox.get(clientMsgId) !== entry) return;
        this.#acknowledged(clientMsgId, ack.timestamp, ack.offset ?? null);
      },
      (err) => {
        // A lost link keeps the message for the resend after reconnecting.
        if (err.code === LINK_LOST) return;
        if (err.code === 'rateLimited' || err.code === 'unavailable') {
          // Sent too fast, or the server cannot store messages right now: it
          // dropped it; send it again when allowed.
          entry.sentOn = -1;
          setTimeout(() => {
            if (this.#outbox.get(clientMsgId) === entry && entry.sentOn === -1 && this.#ready && !this.#syncing) {
              this.#transmit(clientMsgId);
            }
          }, err.retryAfterMs ?? 1000);
          return;
        }
        this.#outbox.delete(clientMsgId);
        this.#emit('messageRejected', { clientMsgId, message: err.message, code: err.code });
        this.#emitQueue();
      },
    );
  }

  /** One of ours is accepted: by its messageAck, or seen in a replay. */
  #acknowledged(clientMsgId, timestamp, offset) {
    this.#outbox.delete(clientMsgId);
    // Our own messages come back only in a replay or in history; the
    // replay's copy is not news.
    this.#remember(clientMsgId);
    this.#emit('messageAcked', { clientMsgId, timestamp, offset, epoch: offset === null ? null : (this.#stream?.epoch ?? null) });
    this.#emitQueue();
  }

  #emitQueue() {
    this.#emit('queueChange', { queued: this.#outbox.size });
  }

  // ---- history -----------------------------------------------------------

  /**
   * Earlier messages of the current room, oldest first: the newest `limit`
   * (1 to 100, default 50), or those before offset `before`. Waits while the
   * client is offline or restoring its session, and asks again on the new
   * link if the old one drops. Resolves with `{room, epoch, messages,
   * hasMore}`; each message is the detail a `message` or `fileShared` event
   * would carry, with `type` ('message' or 'fileShared'), `offset` and
   * `epoch`.
   * @param {{before?: number, limit?: number}} [options]
   */
  async history({ before, limit } = {}) {
    if (before !== undefined && before !== null && !(Number.isSafeInteger(before) && before >= 1)) {
      throw new HubbubError('Invalid before: must be an offset (a whole number from 1)', 'invalidValue');
    }
    if (limit !== undefined && limit !== null && !(Number.isInteger(limit) && limit >= 1 && limit <= 100)) {
      throw new HubbubError('Invalid limit: must be a whole number from 1 to 100', 'invalidValue');
    }
    const msg = { type: 'history' };
    if (before !== undefined && before !== null) msg.before = before;
    if (limit !== undefined && limit !== null) msg.limit = limit;
    for (;;) {
      if (this.#desired.room === null) throw new HubbubError('Join a room before asking for its history', 'notInRoom');
      await this.#whenReady();
      try {
        const reply = await this.#request(msg, 'history');
        const epoch = reply.epoch ?? null;
        const messages = (Array.isArray(reply.messages) ? reply.messages : [])
          .map((m) => roomEvent(m, epoch))
          .filter((m) => m !== null);
        return { room: reply.room, epoch, messages, hasMore: Boolean(reply.hasMore) };
      } catch (err) {
        if (err.code !== LINK_LOST) throw err;
      }
    }
  }

  /** The position this client has in a room's stream, or null. */
  position(room) {
    const at = this.#positions.get(room);
    return at ? { ...at } : null;
  }

  /** A roomJoined arrived: set the stream, the position, and say whether the gap is covered. */
  #joined(msg, restored) {
    const room = msg.room;
    const epoch = typeof msg.epoch === 'string' ? msg.epoch : null;
    const offset = typeof msg.offset === 'number' ? msg.offset : 0;
    this.#stream = { room, epoch };
    this.#replay = null;
    const previous = this.#positions.get(room) ?? null;
    const detail = {
      room,
      userCount: msg.userCount,
      restored,
      epoch,
      offset: epoch === null ? null : offset,
      recovered: msg.recovered ?? null,
      missed: msg.missed ?? null,
    };
    if (epoch === null) {
      // A server without history: nothing to remember or recover.
      this.#positions.delete(room);
      this.#emit('roomJoined', detail);
      return;
    }
    const recovered = previous !== null && msg.recovered === true && previous.epoch === epoch;
    if (recovered) {
      // The missed messages follow; each moves the position on.
      if (offset > previous.offset) this.#replay = { room, until: offset, missed: msg.missed ?? offset - previous.offset };
    } else {
      this.#positions.delete(room);
      this.#positions.set(room, { epoch, offset });
    }
    this.#emit('roomJoined', detail);
    if (previous === null) return;
    if (recovered) {
      if (this.#replay === null) this.#emit('recovered', { room, epoch, offset, missed: 0 });
    } else {
      this.#emit('recoveryFailed', {
        room,
        epoch,
        offset,
        previous: { ...previous },
        epochChanged: previous.epoch !== epoch,
        restored,
      });
    }
  }

  /**
   * The server restarted a room's stream (`resync`): what follows is not
   * continuous with what this client delivered. The position becomes the
   * one given, so live messages above `offset` are news and the next join
   * asks from there; a replay under way ends.
   */
  #resync(msg) {
    const { room, epoch, offset } = msg;
    if (typeof room !== 'string' || typeof epoch !== 'string' || !Number.isSafeInteger(offset) || offset < 0) return;
    const previous = this.#positions.get(room) ?? null;
    this.#positions.delete(room);
    this.#positions.set(room, { epoch, offset });
    if (this.#stream?.room === room) this.#stream = { room, epoch };
    if (this.#replay?.room === room) this.#replay = null;
    this.#emit('resync', {
      room,
      epoch,
      offset,
      previous: previous === null ? null : { ...previous },
      epochChanged: previous === null || previous.epoch !== epoch,
    });
  }

  /**
   * Admits a room message by its offset: null if it is not newer than what
   * was delivered (a replay overlapping live delivery), else `{epoch,
   * missed, last}` (`last`: it ends a replay).
   */
  #admit(msg) {
    const stream = this.#stream;
    if (stream === null || stream.epoch === null || typeof msg.offset !== 'number') {
      return { epoch: stream?.epoch ?? null, missed: false, last: false };
    }
    const at = this.#positions.get(stream.room);
    if (at && at.epoch === stream.epoch) {
      if (msg.offset <= at.offset) return null;
      at.offset = msg.offset;
    } else {
      this.#positions.set(stream.room, { epoch: stream.epoch, offset: msg.offset });
    }
    const replay = this.#replay;
    if (replay === null || replay.room !== stream.room) return { epoch: stream.epoch, missed: false, last: false };
    if (msg.offset < replay.until) return { epoch: stream.epoch, missed: true, last: false };
    this.#replay = null;
    return { epoch: stream.epoch, missed: true, last: true, count: replay.missed };
  }

  #endReplay(admitted) {
    if (!admitted.last) return;
    const at = this.#positions.get(this.#stream.room);
    this.#emit('recovered', { room: this.#stream.room, epoch: at.epoch, offset: at.offset, missed: admitted.count });
  }

  // ---- files -------------------------------------------------------------

  /**
   * Uploads a file (a File or Blob) to the room. Resolves with the stored
   * file once the server saved it and its SHA-256 matched; uploads run one
   * at a time and continue after a reconnect.
   * @param {Blob} file
   * @param {{name?: string, mimeType?: string}} [options]
   * @returns {Promise<{transferId: string, fileId: string, name: string, size: number, mimeType: string, sha256: string, url: string}>}
   */
  sendFile(file, options = {}) {
    if (!(file instanceof Blob)) throw new HubbubError('sendFile needs a File or a Blob', 'invalidValue');
    if (this.#desired.room === null) throw new HubbubError('Join a room before sharing files', 'notInRoom');
    if (this.#uploads.length >= this.#options.uploadQueue) {
      throw new HubbubError(`Too many uploads waiting (${this.#uploads.length})`, 'queueFull');
    }
    const name = options.name ?? (file.name || 'file');
    const job = {
      transferId: uuid(),
      file,
      name,
      size: file.size,
      mimeType: options.mimeType ?? file.type ?? '',
      sha256: undefined,
      chunkSize: this.#options.chunkSize,
      started: false,
      restarts: 0,
      failed: null,
      sentBytes: 0,
      receivedBytes: 0,
      lastProgress: 0,
    };
    const done = new Promise((resolve, reject) => {
      job.resolve = resolve;
      job.reject = reject;
    });
    this.#uploads.push(job);
    this.#emit('fileQueued', { transferId: job.transferId, name, size: job.size, mimeType: job.mimeType });
    this.#pumpUploads();
    return done;
  }

  #pumpUploads() {
    if (this.#uploadRunning || !this.#ready || this.#syncing) return;
    const job = this.#uploads[0];
    if (!job) return;
    this.#runUpload(job, this.#generation);
  }

  async #runUpload(job, gen) {
    this.#uploadRunning = true;
    let finished = false;
    try {
      if (job.sha256 === undefined) job.sha256 = await sha256Hex(job.file);
      let missing;
      for (;;) {
        if (!job.started) {
          const accepted = await this.#request(
            {
              type: 'fileStart',
              name: job.name,
              size: job.size,
              mimeType: job.mimeType,
              ...(job.sha256 ? { sha256: job.sha256 } : {}),
              chunkSize: job.chunkSize,
              transferId: job.transferId,
            },
            'file',
            job.transferId,
          );
          job.started = true;
          job.chunkSize = accepted.chunkSize;
          missing = allChunks(job.size, job.chunkSize);
          break;
        }
        try {
          const state = await this.#request({ type: 'fileResume', transferId: job.transferId }, 'file', job.transferId);
          job.chunkSize = state.chunkSize;
          missing = missingChunks(job.size, job.chunkSize, state.receivedChunks);
          break;
        } catch (err) {
          if (err.code === LINK_LOST || job.restarts >= 1) throw err;
          // The server no longer has the upload (it restarted, or the
          // upload expired): start it over, once.
          job.restarts += 1;
          job.started = false;
        }
      }
      await this.#sendChunks(job, missing, gen);
      const saved = await this.#request({ type: 'fileEnd', transferId: job.transferId }, 'file', job.transferId);
      if (job.sha256 && saved.sha256 && saved.sha256.toLowerCase() !== job.sha256) {
        throw new HubbubError('The stored file does not match the file sent (SHA-256 differs)', 'checksum');
      }
      finished = true;
      this.#uploads.shift();
      if (saved.fileId) this.#remember(`file:${saved.fileId}`);
      const detail = {
        transferId: job.transferId,
        fileId: saved.fileId,
        name: saved.name,
        size: saved.size,
        mimeType: saved.mimeType,
        sha256: saved.sha256,
        url: saved.url,
      };
      this.#progress(job, true);
      this.#emit('fileSaved', detail);
      job.resolve(detail);
    } catch (err) {
      if (err.code === LINK_LOST) {
        // Continues with fileResume once the session is restored.
      } else {
        finished = true;
        this.#uploads.shift();
        const message = err.message || String(err);
        this.#emit('fileFailed', { transferId: job.transferId, name: job.name, message, code: err.code });
        job.reject(err instanceof HubbubError ? err : new HubbubError(message, 'upload'));
      }
    } finally {
      this.#uploadRunning = false;
      if (finished || gen !== this.#generation) this.#pumpUploads();
    }
  }

  async #sendChunks(job, indices, gen) {
    const lost = () => new HubbubError('The connection was lost', LINK_LOST);
    const already = job.size - indices.reduce((sum, i) => sum + chunkLength(job, i), 0);
    let handed = already;
    job.sentBytes = already;
    for (const index of indices) {
      if (job.failed) throw job.failed;
      await this.#drain(gen, job, handed);
      const start = index * job.chunkSize;
      const data = await job.file.slice(start, Math.min(start + job.chunkSize, job.size)).arrayBuffer();
      if (job.failed) throw job.failed;
      if (gen !== this.#generation || !this.#ws) throw lost();
      const frame = new Uint8Array(4 + data.byteLength);
      new DataView(frame.buffer).setUint32(0, index);
      frame.set(new Uint8Array(data), 4);
      this.#ws.send(frame);
      handed += data.byteLength;
      job.sentBytes = Math.max(job.sentBytes, handed - this.#ws.bufferedAmount);
      this.#progress(job, false);
    }
    job.sentBytes = handed;
  }

  /** Waits while the socket's send buffer is above the high-water mark. */
  async #drain(gen, job, handed) {
    while (this.#ws && gen === this.#generation && this.#ws.bufferedAmount > this.#options.uploadHighWater) {
      await new Promise((resolve) => setTimeout(resolve, 10));
      if (this.#ws) job.sentBytes = Math.max(job.sentBytes, handed - this.#ws.bufferedAmount);
      this.#progress(job, false);
    }
    if (gen !== this.#generation || !this.#ws) throw new HubbubError('The connection was lost', LINK_LOST);
  }

  #progress(job, force) {
    const now = performance.now();
    if (!force && now - job.lastProgress < this.#options.progressInterval) return;
    job.lastProgress = now;
    const sentBytes = force ? job.size : Math.min(job.size, Math.max(job.sentBytes, job.receivedBytes));
    this.#emit('fileProgress', {
      transferId: job.transferId,
      name: job.name,
      size: job.size,
      sentBytes,
      receivedBytes: force ? job.size : job.receivedBytes,
    });
  }

  // ---- frames ------------------------------------------------------------

  #sendJson(msg) {
    if (!this.#ws || this.#ws.readyState !== OPEN) return false;
    this.#ws.send(JSON.stringify(msg));
    return true;
  }

  /** Sends a command that the server answers; resolves with the answer. */
  #request(msg, kind, key = null) {
    return new Promise((resolve, reject) => {
      if (!this.#ws || this.#ws.readyState !== OPEN) {
        reject(new HubbubError('The connection was lost', LINK_LOST));
        return;
      }
      this.#pending.push({ kind, key, resolve, reject });
      this.#sendJson(msg);
    });
  }

  /** Resolves the oldest pending command of `kind` (and `key`). */
  #answer(kind, key, msg) {
    const at = this.#pending.findIndex((p) => p.kind === kind && (key === null || p.key === key));
    if (at < 0) return false;
    const [request] = this.#pending.splice(at, 1);
    request.resolve(msg);
    return true;
  }

  #onFrame(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.#emit('error', { message: 'The server sent a frame that is not JSON', code: 'badFrame' });
      return;
    }
    if (msg === null || typeof msg !== 'object' || typeof msg.type !== 'string') return;
    switch (msg.type) {
      case 'welcome':
        this.#emit('welcome', { message: msg.message });
        break;
      case 'connected':
        this.#clientId = msg.clientId;
        break;
      case 'usernameSet':
        this.#answer('setUsername', null, msg);
        this.#emit('usernameSet', { username: msg.username });
        break;
      case 'roomJoined':
        this.#answer('joinRoom', null, msg);
        this.#joined(msg, !this.#ready && this.#everConnected);
        break;
      case 'roomLeft':
        this.#stream = null;
        this.#replay = null;
        this.#answer('leaveRoom', null, msg);
        this.#emit('roomLeft', { room: msg.room });
        break;
      case 'resync':
        this.#resync(msg);
        break;
      case 'userJoined':
        this.#emit('userJoined', { user: msg.user, room: msg.room, userCount: msg.userCount });
        break;
      case 'userLeft':
        this.#emit('userLeft', { user: msg.user, room: msg.room ?? null, userCount: msg.userCount });
        break;
      case 'userRenamed':
        this.#emit('userRenamed', { user: msg.user, previous: msg.previous, room: msg.room ?? null });
        break;
      case 'userTyping':
        this.#emit('userTyping', { user: msg.user });
        break;
      case 'chatMessage': {
        const admitted = this.#admit(msg);
        if (admitted === null) break;
        const id = msg.clientMsgId;
        if (id && this.#outbox.has(id)) {
          // Our own, replayed: the server had it before the link dropped.
          this.#acknowledged(id, msg.timestamp, msg.offset ?? null);
        } else if (!id || this.#remember(id)) {
          this.#emit('message', { ...roomEvent(msg, admitted.epoch), missed: admitted.missed });
        }
        this.#endReplay(admitted);
        break;
      }
      case 'messageAck':
        this.#answer('chatMessage', msg.clientMsgId, msg);
        break;
      case 'history':
        this.#answer('history', null, msg);
        break;
      case 'chat':
        this.#emit('lobbyChat', { user: msg.user, text: msg.text });
        break;
      case 'pong':
        this.#onPong(msg);
        break;
      case 'error': {
        // The server answers commands in order, so an error answers the
        // oldest command still waiting.
        const request = this.#pending.shift();
        this.#emit('error', {
          message: msg.message,
          code: msg.code ?? null,
          command: request?.kind ?? null,
          retryAfterMs: msg.retryAfterMs ?? null,
        });
        const err = new HubbubError(msg.message, msg.code ?? 'server');
        if (typeof msg.retryAfterMs === 'number') err.retryAfterMs = msg.retryAfterMs;
        request?.reject(err);
        break;
      }
      case 'fileAccepted':
      case 'fileResumeState':
      case 'fileSaved':
        this.#answer('file', msg.transferId, msg);
        break;
      case 'fileProgress': {
        const job = this.#uploads.find((j) => j.transferId === msg.transferId);
        if (job) {
          job.receivedBytes = msg.receivedBytes;
          this.#progress(job, false);
        }
        break;
      }
      case 'fileError':
        this.#onFileError(msg);
        break;
      case 'fileShared': {
        const admitted = this.#admit(msg);
        if (admitted === null) break;
        // Our own shares come back only in a replay; they are not news.
        if (!msg.fileId || this.#remember(`file:${msg.fileId}`)) {
          this.#emit('fileShared', { ...roomEvent(msg, admitted.epoch), missed: admitted.missed });
        }
        this.#endReplay(admitted);
        break;
      }
      default:
        // Newer servers may send more; an old client ignores it.
        break;
    }
  }

  #onFileError(msg) {
    const err = new HubbubError(msg.message, 'fileError');
    const at = this.#pending.findIndex((p) => p.kind === 'file' && (msg.transferId == null || p.key === msg.transferId));
    if (at >= 0) {
      const [request] = this.#pending.splice(at, 1);
      request.reject(err);
      return;
    }
    // Not an answer: the active upload failed while its chunks streamed.
    const job = this.#uploads[0];
    if (job && (msg.transferId == null || msg.transferId === job.transferId)) job.failed = err;
  }

  /** Records a received message id; false if it was seen before. */
  #remember(id) {
    if (this.#seen.has(id)) return false;
    this.#seen.add(id);
    if (this.#seen.size > this.#options.seenMessageIds) {
      this.#seen.delete(this.#seen.values().next().value);
    }
    return true;
  }

  // ---- heartbeat ---------------------------------------------------------

  // The rules are the server's (hubbub-heartbeat), stated once in
  // docs/PROTOCOL.md#heartbeat: the first ping an interval after the link
  // opens, each later one an interval after the previous one was sent; one
  // ping outstanding at a time; only a pong with its token answers it, and
  // only before its deadline (`timeout` after it was sent); a missed
  // deadline drops the link. Times are performance.now(), which a clock
  // change cannot move.

  #startHeartbeat(gen) {
    this.#stopHeartbeat();
    if (!this.#options.heartbeat) return;
    this.#beatDue = performance.now() + this.#options.heartbeat.interval;
    this.#armHeartbeat(gen);
    // A first round trip for the page to show, without waiting an interval.
    this.ping();
  }

  #stopHeartbeat() {
    clearTimeout(this.#beatTimer);
    this.#beatTimer = null;
    this.#beatPing = null;
    this.#probes.clear();
  }

  /** Arms the one timer for the next deadline: the pong's, or the next ping's. */
  #armHeartbeat(gen) {
    clearTimeout(this.#beatTimer);
    const beat = this.#options.heartbeat;
    const at = this.#beatPing ? this.#beatPing.sent + beat.timeout : this.#beatDue;
    this.#beatTimer = setTimeout(() => this.#heartbeat(gen), Math.max(0, at - performance.now()));
  }

  /** The timer fired (browsers may fire it late, never early). */
  #heartbeat(gen) {
    if (gen !== this.#generation) return;
    const beat = this.#options.heartbeat;
    const now = performance.now();
    if (this.#beatPing) {
      if (now >= this.#beatPing.sent + beat.timeout) {
        this.#drop(gen, 'heartbeat timeout');
        return;
      }
    } else if (now >= this.#beatDue) {
      const token = ++this.#beatToken;
      this.#beatPing = { token, sent: now };
      this.#sendJson({ type: 'ping', timestamp: token });
    }
    this.#armHeartbeat(gen);
  }

  #onPong(msg) {
    const now = performance.now();
    const beat = this.#options.heartbeat;
    const outstanding = this.#beatPing;
    let sent;
    if (outstanding && msg.timestamp === outstanding.token) {
      // A pong at or after the deadline does not count, even if the timer
      // has not fired yet: the link is dead from the deadline on.
      if (now >= outstanding.sent + beat.timeout) return;
      sent = outstanding.sent;
      this.#beatPing = null;
      this.#beatDue = sent + beat.interval;
      this.#armHeartbeat(this.#generation);
    } else if (this.#probes.has(msg.timestamp)) {
      sent = this.#probes.get(msg.timestamp);
      this.#probes.delete(msg.timestamp);
    } else {
      return;
    }
    const rtt = now - sent;
    this.#latency = rtt;
    this.#emit('latency', { rtt, serverTime: msg.serverTime });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// ---- helpers ---------------------------------------------------------------

/**
 * Latency probes (ping()) carry tokens from here up, far above any heartbeat
 * token, so a probe's pong never answers a heartbeat ping. 2^48: integers stay
 * exact in a JavaScript number and in the server's echo.
 */
const PROBE_BASE = 2 ** 48;

/**
 * The delay before reconnect attempt `attempt` (from 1), in ms:
 * `initialDelay × multiplier^(attempt−1)`, capped at `maxDelay`, moved by up
 * to ± `jitter` of itself (`random` in [0, 1) picks where; 0.5 is none).
 */
export function backoff(policy, attempt, random) {
  // The exponent is bounded so that endless retrying never computes
  // Infinity (or 0 × Infinity) on its way to the cap.
  const growth = policy.multiplier ** Math.min(Math.max(attempt - 1, 0), 64);
  const nominal = Math.min(policy.initialDelay * growth, policy.maxDelay);
  const spread = Math.min(Math.max(policy.jitter, 0), 1) * (2 * random - 1);
  return Math.round(Math.min(Math.max(nominal * (1 + spread), 0), policy.maxDelay));
}

/**
 * The detail of a room message (`chatMessage` or `fileShared`, live,
 * replayed or from history) as the application sees it; null for other
 * types.
 */
function roomEvent(msg, epoch) {
  if (msg === null || typeof msg !== 'object') return null;
  const offset = typeof msg.offset === 'number' ? msg.offset : null;
  if (msg.type === 'chatMessage') {
    return {
      type: 'message',
      user: msg.user,
      text: msg.text,
      timestamp: msg.timestamp,
      clientMsgId: msg.clientMsgId ?? null,
      offset,
      epoch,
    };
  }
  if (msg.type === 'fileShared') {
    return {
      type: 'fileShared',
      user: msg.user,
      fileId: msg.fileId,
      name: msg.name,
      size: msg.size,
      mimeType: msg.mimeType,
      url: msg.url,
      timestamp: typeof msg.timestamp === 'number' ? msg.timestamp : null,
      offset,
      epoch,
    };
  }
  return null;
}

function mergeOptions(options) {
  const reconnect = { ...DEFAULTS.reconnect, ...(options.reconnect ?? {}) };
  if (reconnect.maxAttempts === null || reconnect.maxAttempts === undefined) reconnect.maxAttempts = Infinity;
  const heartbeat = options.heartbeat === false ? false : { ...DEFAULTS.heartbeat, ...(options.heartbeat ?? {}) };
  const limits = { ...DEFAULTS.limits, ...(options.limits ?? {}) };
  return { ...DEFAULTS, ...options, reconnect, heartbeat, limits };
}

/**
 * The endpoints to try, in order: `url`, then `urls` (duplicates dropped);
 * `/ws/chat` on the page's host when neither is given.
 */
function resolveUrls(url, urls) {
  if (urls !== null && urls !== undefined && !(Array.isArray(urls) && urls.every((u) => typeof u === 'string'))) {
    throw new HubbubError('Invalid urls: must be an array of URL strings', 'invalidValue');
  }
  const given = [...(url === undefined || url === null ? [] : [url]), ...(urls ?? [])];
  // Neither: `/ws/chat` on the page's host.
  if (given.length === 0) given.push(undefined);
  return [...new Set(given.map(resolveUrl))];
}

function resolveUrl(url) {
  const base = globalThis.location?.href;
  const target = new URL(url ?? '/ws/chat', base);
  if (target.protocol === 'http:') target.protocol = 'ws:';
  if (target.protocol === 'https:') target.protocol = 'wss:';
  return target.href;
}

function detach(ws) {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}

function checkName(value, field, max) {
  const name = typeof value === 'string' ? value.trim() : '';
  if (name === '') throw new HubbubError(`Invalid ${field}: must not be empty`, 'invalidValue');
  if (countChars(name) > max) throw new HubbubError(`Invalid ${field}: must be at most ${max} characters`, 'invalidValue');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) {
    throw new HubbubError(`Invalid ${field}: must not contain control characters`, 'invalidValue');
  }
  return name;
}

/** Characters as the server counts them (Unicode scalar values). */
function countChars(text) {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

/** A random (v4) UUID; falls back to getRandomValues outside secure contexts. */
function uuid() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Lower-case hex SHA-256 of a Blob, or null where Web Crypto is unavailable (plain http on a non-local host). */
async function sha256Hex(blob) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await globalThis.crypto.subtle.digest('SHA-256', await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((x) => x.toString(16).padStart(2, '0')).join('');
}

function chunkCount(size, chunkSize) {
  return Math.ceil(size / chunkSize);
}

function chunkLength(job, index) {
  return Math.min(job.chunkSize, job.size - index * job.chunkSize);
}

function allChunks(size, chunkSize) {
  return Array.from({ length: chunkCount(size, chunkSize) }, (_, i) => i);
}

/** The chunk indices not covered by the server's half-open ranges. */
function missingChunks(size, chunkSize, ranges) {
  const have = (i) => ranges.some(([start, end]) => i >= start && i < end);
  return allChunks(size, chunkSize).filter((i) => !have(i));
}
