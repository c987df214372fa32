'use strict';
// The classic Node.js `ws` chat tutorial's server, written the way that
// tutorial and the ws README write it: one WebSocketServer on an HTTP
// server, rooms as a Map of Sets of sockets, usernames on the socket, JSON
// messages with a `type`. It speaks the chat protocol Hubbub speaks (see
// docs/PROTOCOL.md), so `cargo xtask loadtest --compare node-ws` can run the
// same scenarios against both. Each broadcast is encoded once and the same
// string is sent to every recipient, as a careful `ws` user would.
//
// It exists only to be measured against: keep it faithful and idiomatic,
// never weakened. `bufferutil` is installed beside `ws`, as ws's README
// recommends for performance (ws loads it by itself when present).
//
// Usage: HOST=127.0.0.1 PORT=0 node server.js
// Prints `Node ws reference listening on HOST:PORT` once it accepts.

const http = require('node:http');
const crypto = require('node:crypto');
const { WebSocketServer, WebSocket } = require('ws');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 8080);

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

// Room name -> Set of member sockets.
const rooms = new Map();

function send(ws, message) {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

// Sends one encoded message to every member of a room but `except`.
function broadcastToRoom(roomName, message, except) {
  const room = rooms.get(roomName);
  if (!room) return;
  const data = JSON.stringify(message);
  for (const client of room) {
    if (client !== except && client.readyState === WebSocket.OPEN) client.send(data);
  }
}

function leaveRoom(ws) {
  const roomName = ws.room;
  if (!roomName) return;
  ws.room = null;
  const room = rooms.get(roomName);
  if (!room) return;
  room.delete(ws);
  if (room.size === 0) {
    rooms.delete(roomName);
  } else {
    broadcastToRoom(roomName, { type: 'userLeft', user: ws.username, userCount: room.size });
  }
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
  broadcastToRoom(roomName, { type: 'userJoined', user: ws.username, room: roomName, userCount: room.size });
  send(ws, { type: 'roomJoined', room: roomName, userCount: room.size });
}

wss.on('connection', (ws) => {
  ws.id = crypto.randomUUID();
  ws.username = 'Anonymous';
  ws.room = null;

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
        broadcastToRoom(
          ws.room,
          { type: 'chatMessage', user: ws.username, text: message.text, timestamp: Date.now() },
          ws,
        );
        break;
      case 'typing':
        if (ws.room) broadcastToRoom(ws.room, { type: 'userTyping', user: ws.username }, ws);
        break;
      case 'chat': {
        const data = JSON.stringify({ type: 'chat', user: message.user || ws.username, text: message.text });
        for (const client of wss.clients) {
          if (client.readyState === WebSocket.OPEN) client.send(data);
        }
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

server.listen(port, host, () => {
  const { address, port: bound } = server.address();
  console.log(`Node ws reference listening on ${address}:${bound}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const client of wss.clients) client.terminate();
    server.close(() => process.exit(0));
  });
}
