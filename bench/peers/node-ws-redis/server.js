'use strict';
// The classic Node.js `ws` chat tutorial's server (bench/peers/node-ws),
// scaled to several processes the way a user of that tutorial would scale
// it: every process runs the same server, and they share one Redis through
// pub/sub with the npm `redis` client. It speaks the chat protocol Hubbub
// speaks (see docs/PROTOCOL.md), so `cargo xtask loadtest fanout --cluster 3
// --compare node-ws-redis` runs the same clients against N of these and
// against N Hubbub nodes.
//
// How it scales, as the "scaling WebSockets with Redis pub/sub" recipes do:
// - one channel per room, `room:NAME`, and one for the lobby, `lobby`;
// - two Redis connections per process: `publisher` for commands and
//   PUBLISH, `subscriber` for SUBSCRIBE (a subscribed connection can do
//   nothing else);
// - a room event (userJoined, userLeft, chatMessage, userTyping) is
//   published, not sent; each process subscribes to the rooms it has local
//   members in, and sends what arrives on a channel to its local members of
//   that room, except the sender, whose id the published payload carries.
//   Its own messages reach its own members the same way, so there is one
//   delivery path;
// - a room's member count is a Redis set of client ids, so userCount counts
//   the members on every process.
// Each message that arrives is encoded once per process and the same string
// is sent to every local recipient, as the node-ws peer does.
//
// It exists only to be measured against: keep it faithful and idiomatic,
// never weakened. `bufferutil` is installed beside `ws`, as in node-ws.
//
// Usage: node server.js [--host 127.0.0.1] [--port 0] [--redis-url redis://127.0.0.1:6379]
//   or HOST=127.0.0.1 PORT=0 REDIS_URL=redis://127.0.0.1:6379 node server.js
// Prints `Node ws + Redis reference listening on HOST:PORT` once it
// accepts (after both Redis connections are up).

const http = require('node:http');
const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const { WebSocketServer, WebSocket } = require('ws');
const { createClient } = require('redis');

const { values: args } = parseArgs({
  options: {
    host: { type: 'string' },
    port: { type: 'string' },
    'redis-url': { type: 'string' },
  },
});
const host = args.host || process.env.HOST || '127.0.0.1';
const port = Number(args.port || process.env.PORT || 8080);
const redisUrl = args['redis-url'] || process.env.REDIS_URL || 'redis://127.0.0.1:6379';

const publisher = createClient({ url: redisUrl });
const subscriber = publisher.duplicate();
for (const client of [publisher, subscriber]) {
  client.on('error', (err) => console.error('redis:', err.message));
}

const server = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('OK');
    return;
  }
  res.writeHead(404);
  res.end();
});

const wss = new WebSocketServer({ server });

// Room name -> Set of this process's member sockets.
const rooms = new Map();
// Room name -> the promise of this process's subscription to its channel.
const subscriptions = new Map();

const roomChannel = (roomName) => `room:${roomName}`;
const membersKey = (roomName) => `room:${roomName}:members`;
const LOBBY = 'lobby';

function send(ws, message) {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

// Publishes a room event to every process; `except` is the id of a client
// that must not receive it (the sender), or null.
function publishToRoom(roomName, message, except) {
  return publisher
    .publish(roomChannel(roomName), JSON.stringify({ except, message }))
    .catch((err) => console.error('publish:', err.message));
}

// What arrives on a room's channel: sent once encoded to each local member
// but the one the payload excludes.
function onRoomMessage(payload, channel) {
  const room = rooms.get(channel.slice('room:'.length));
  if (!room) return;
  const { except, message } = JSON.parse(payload);
  const data = JSON.stringify(message);
  for (const client of room) {
    if (client.id !== except && client.readyState === WebSocket.OPEN) client.send(data);
  }
}

function onLobbyMessage(data) {
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) client.send(data);
  }
}

// Subscribes this process to a room's channel once, when its first local
// member joins.
function subscribe(roomName) {
  let subscribed = subscriptions.get(roomName);
  if (!subscribed) {
    subscribed = subscriber.subscribe(roomChannel(roomName), onRoomMessage);
    subscriptions.set(roomName, subscribed);
  }
  return subscribed;
}

function unsubscribe(roomName) {
  subscriptions.delete(roomName);
  subscriber
    .unsubscribe(roomChannel(roomName), onRoomMessage)
    .catch((err) => console.error('unsubscribe:', err.message));
}

// Runs a client's room changes one after the other, so that a leave (or a
// close) never overtakes the join before it in Redis.
function inOrder(ws, step) {
  ws.roomChanges = ws.roomChanges
    .then(step)
    .catch((err) => console.error('room change:', err.message));
}

function leaveRoom(ws) {
  const roomName = ws.room;
  if (!roomName) return;
  ws.room = null;
  const room = rooms.get(roomName);
  if (room) {
    room.delete(ws);
    if (room.size === 0) {
      rooms.delete(roomName);
      unsubscribe(roomName);
    }
  }
  const { id, username } = ws;
  inOrder(ws, async () => {
    const [, userCount] = await publisher.multi().sRem(membersKey(roomName), id).sCard(membersKey(roomName)).exec();
    if (userCount > 0) await publishToRoom(roomName, { type: 'userLeft', user: username, userCount }, null);
  });
}

function joinRoom(ws, roomName) {
  leaveRoom(ws);
  let room = rooms.get(roomName);
  if (!room) {
    room = new Set();
    rooms.set(roomName, room);
  }
  room.add(ws);
  ws.room = roomName;
  const { id, username } = ws;
  inOrder(ws, async () => {
    // Subscribed before anything is published, so the joiner receives
    // everything published after its own userJoined.
    await subscribe(roomName);
    const [, userCount] = await publisher.multi().sAdd(membersKey(roomName), id).sCard(membersKey(roomName)).exec();
    // The joiner gets its userJoined, then roomJoined, straight away; the
    // other members, here and on the other processes, through Redis.
    const joined = { type: 'userJoined', user: username, room: roomName, userCount };
    send(ws, joined);
    send(ws, { type: 'roomJoined', room: roomName, userCount });
    await publishToRoom(roomName, joined, id);
  });
}

wss.on('connection', (ws) => {
  ws.id = crypto.randomUUID();
  ws.username = 'Anonymous';
  ws.room = null;
  ws.roomChanges = Promise.resolve();

  send(ws, { type: 'welcome', message: 'Welcome to the chat!' });
  send(ws, { type: 'connected', clientId: ws.id });

  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    let message;
    try {
      message = JSON.parse(data);
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
        ws.username = String(message.username || '').trim() || 'Anonymous';
        send(ws, { type: 'usernameSet', username: ws.username });
        break;
      case 'joinRoom': {
        const roomName = String(message.room || '').trim();
        if (!roomName) {
          send(ws, { type: 'error', message: 'Room name required' });
          break;
        }
        joinRoom(ws, roomName);
        break;
      }
      case 'leaveRoom':
        leaveRoom(ws);
        break;
      case 'chatMessage':
        if (!ws.room) {
          send(ws, { type: 'error', message: 'Join a room before sending messages' });
          break;
        }
        publishToRoom(
          ws.room,
          { type: 'chatMessage', user: ws.username, text: message.text, timestamp: Date.now() },
          ws.id,
        );
        break;
      case 'typing':
        if (ws.room) publishToRoom(ws.room, { type: 'userTyping', user: ws.username }, ws.id);
        break;
      case 'chat': {
        const data = JSON.stringify({ type: 'chat', user: message.user || ws.username, text: message.text });
        publisher.publish(LOBBY, data).catch((err) => console.error('publish:', err.message));
        break;
      }
      case 'ping':
        send(ws, { type: 'pong', timestamp: message.timestamp, serverTime: Date.now() });
        break;
      default:
        send(ws, { type: 'error', message: `Unknown message type: ${message.type}` });
    }
  });

  ws.on('close', () => leaveRoom(ws));
  ws.on('error', () => {});
});

async function main() {
  await Promise.all([publisher.connect(), subscriber.connect()]);
  await subscriber.subscribe(LOBBY, onLobbyMessage);
  server.listen(port, host, () => {
    const { address, port: bound } = server.address();
    console.log(`Node ws + Redis reference listening on ${address}:${bound}`);
  });
}

main().catch((err) => {
  console.error('cannot start:', err.message);
  process.exit(1);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const client of wss.clients) client.terminate();
    server.close(() => {
      Promise.allSettled([publisher.quit(), subscriber.quit()]).then(() => process.exit(0));
    });
  });
}
