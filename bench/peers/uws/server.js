'use strict';
// The chat server of ../node-ws/server.js (the classic Node `ws` chat
// tutorial's server), written the way uWebSockets.js's README and examples
// write it: one `uWS.App().ws('/*', ...)` route, per-connection state in the
// user data given to `res.upgrade`, rooms as pub/sub topics, each broadcast
// encoded once and published once. It speaks the chat protocol Hubbub speaks
// (see docs/PROTOCOL.md), message for message and field for field like the
// node-ws peer, so `cargo xtask loadtest --compare node-ws,uws` can run the
// same scenarios against all three.
//
// It exists only to be measured against: keep it faithful and idiomatic,
// never weakened and never given shortcuts the node-ws peer does not take
// (same validation, same messages, same recipients).
//
// uWebSockets.js's own builds are not on npm (and need a newer glibc than
// Debian 12's); @trufflesuite/uws-js-unofficial is a public build of the same
// C++ code. Its entry point quietly falls back to a JavaScript
// implementation on top of `ws` when the native addon fails to load, which
// would measure `ws` again under another name, so the addon is required
// directly here and a failure to load it is fatal.
//
// Usage: HOST=127.0.0.1 PORT=0 node server.js
// Prints `uWebSockets.js reference listening on HOST:PORT` once it accepts.

const crypto = require('node:crypto');
const path = require('node:path');

const addon = path.join(
  __dirname,
  'node_modules/@trufflesuite/uws-js-unofficial/binaries',
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);
let uWS;
try {
  uWS = require(addon);
} catch (err) {
  console.error(`uws peer: cannot load the native uWebSockets.js addon ${addon}:\n${err}`);
  console.error('uws peer: run `npm ci` in bench/peers/uws; this peer never uses the JavaScript fallback.');
  process.exit(1);
}

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 8080);

// Room topics carry a prefix so no room name can collide with EVERYONE, the
// topic every connection subscribes to for the tutorial's global `chat`.
const EVERYONE = 'everyone';
const topic = (roomName) => `room:${roomName}`;

// Room name -> number of members (the subscribers of its topic).
const rooms = new Map();

const app = uWS.App();

function send(ws, message) {
  ws.send(JSON.stringify(message), false);
}

// `closed`: the socket is closing, so uWS has already dropped its
// subscriptions and it must not be used any more.
function leaveRoom(ws, user, closed) {
  const roomName = user.room;
  if (!roomName) return;
  user.room = null;
  if (!closed) ws.unsubscribe(topic(roomName));
  const count = rooms.get(roomName) - 1;
  if (count === 0) {
    rooms.delete(roomName);
  } else {
    rooms.set(roomName, count);
    app.publish(topic(roomName), JSON.stringify({ type: 'userLeft', user: user.username, userCount: count }), false);
  }
}

function joinRoom(ws, user, roomName) {
  leaveRoom(ws, user, false);
  const count = (rooms.get(roomName) || 0) + 1;
  rooms.set(roomName, count);
  ws.subscribe(topic(roomName));
  user.room = roomName;
  // app.publish reaches every subscriber, the joiner included, as the
  // node-ws peer's broadcast does.
  app.publish(
    topic(roomName),
    JSON.stringify({ type: 'userJoined', user: user.username, room: roomName, userCount: count }),
    false,
  );
  send(ws, { type: 'roomJoined', room: roomName, userCount: count });
}

app.ws('/*', {
  // ws's default maxPayload (the node-ws peer keeps ws's defaults).
  maxPayloadLength: 100 * 1024 * 1024,
  // The node-ws peer has no heartbeat and no idle timeout: neither here.
  idleTimeout: 0,
  sendPingsAutomatically: false,
  // ws buffers without limit; uWS skips a subscriber beyond this, which the
  // load generator would count as lost. Far above what any scenario queues.
  maxBackpressure: 16 * 1024 * 1024,
  compression: uWS.DISABLED,

  upgrade: (res, req, context) => {
    res.upgrade(
      { id: crypto.randomUUID(), username: 'Anonymous', room: null },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },

  open: (ws) => {
    ws.subscribe(EVERYONE);
    send(ws, { type: 'welcome', message: 'Welcome to the chat!' });
    send(ws, { type: 'connected', clientId: ws.getUserData().id });
  },

  message: (ws, data, isBinary) => {
    if (isBinary) return;
    const user = ws.getUserData();
    let message;
    try {
      message = JSON.parse(Buffer.from(data).toString());
    } catch {
      send(ws, { type: 'error', message: 'Invalid message format' });
      return;
    }
    if (message === null || typeof message !== 'object') {
      send(ws, { type: 'error', message: 'Invalid message format' });
      return;
    }

    switch (message.type) {
      case 'setUsername':
        user.username = String(message.username || '').trim() || 'Anonymous';
        send(ws, { type: 'usernameSet', username: user.username });
        break;
      case 'joinRoom': {
        const roomName = String(message.room || '').trim();
        if (!roomName) {
          send(ws, { type: 'error', message: 'Room name required' });
          break;
        }
        joinRoom(ws, user, roomName);
        break;
      }
      case 'leaveRoom':
        leaveRoom(ws, user, false);
        break;
      case 'chatMessage':
        if (!user.room) {
          send(ws, { type: 'error', message: 'Join a room before sending messages' });
          break;
        }
        // ws.publish skips the sender, as the node-ws peer's broadcast does.
        ws.publish(
          topic(user.room),
          JSON.stringify({ type: 'chatMessage', user: user.username, text: message.text, timestamp: Date.now() }),
          false,
        );
        break;
      case 'typing':
        if (user.room) ws.publish(topic(user.room), JSON.stringify({ type: 'userTyping', user: user.username }), false);
        break;
      case 'chat':
        // Everyone, the sender included.
        app.publish(
          EVERYONE,
          JSON.stringify({ type: 'chat', user: message.user || user.username, text: message.text }),
          false,
        );
        break;
      case 'ping':
        send(ws, { type: 'pong', timestamp: message.timestamp, serverTime: Date.now() });
        break;
      default:
        send(ws, { type: 'error', message: `Unknown message type: ${message.type}` });
    }
  },

  close: (ws) => leaveRoom(ws, ws.getUserData(), true),
});

app.get('/health', (res) => {
  res.writeHeader('Content-Type', 'text/plain').end('OK');
});
app.any('/*', (res) => {
  res.writeStatus('404 Not Found').end();
});

app.listen(host, port, (listenSocket) => {
  if (!listenSocket) {
    console.error(`uws peer: cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  console.log(`uWebSockets.js reference listening on ${host}:${uWS.us_socket_local_port(listenSocket)}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    // Closes the listen socket and every connection, like the node-ws
    // peer's terminate-all and server.close.
    app.close();
    process.exit(0);
  });
}
