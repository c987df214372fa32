// A chat client in the style of the classic Node `ws` chat tutorial, run
// against Hubbub by crates/hubbub-server/tests/server.rs. It uses only what
// that tutorial's clients use: `new WebSocket(url)`, JSON.stringify/parse and
// a switch on `type`. Exits 0 when every step behaved as the tutorial's
// server would, 1 otherwise.
import WebSocket from 'ws';

const url = process.argv[2];
if (!url) {
  console.error('usage: node tutorial_client.mjs ws://host:port/');
  process.exit(2);
}

const deadline = setTimeout(() => {
  console.error('timed out waiting for the server');
  process.exit(1);
}, 10_000);

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function expect(condition, message) {
  if (!condition) fail(message);
}

// Opens a client and returns a function that resolves with the next message
// of the given type, failing on anything else.
function connect(name) {
  const ws = new WebSocket(url);
  const queue = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    expect(!isBinary, `${name} got a binary frame`);
    const msg = JSON.parse(data.toString());
    const waiter = waiters.shift();
    if (waiter) waiter(msg);
    else queue.push(msg);
  });
  ws.on('error', (err) => fail(`${name}: ${err.message}`));
  const next = (type) =>
    new Promise((resolve) => {
      const check = (msg) => {
        expect(msg.type === type, `${name} expected ${type}, got ${JSON.stringify(msg)}`);
        resolve(msg);
      };
      const queued = queue.shift();
      if (queued) check(queued);
      else waiters.push(check);
    });
  const send = (msg) => ws.send(JSON.stringify(msg));
  const opened = new Promise((resolve) => ws.on('open', resolve));
  return { ws, next, send, opened };
}

const alice = connect('alice');
await alice.opened;
expect(typeof (await alice.next('welcome')).message === 'string', 'welcome has a message');
expect(/^[0-9a-f-]{36}$/.test((await alice.next('connected')).clientId), 'clientId is a UUID');

alice.send({ type: 'setUsername', username: 'alice' });
expect((await alice.next('usernameSet')).username === 'alice', 'usernameSet echoes the name');
alice.send({ type: 'joinRoom', room: 'general' });
let joined = await alice.next('userJoined');
expect(joined.user === 'alice' && joined.room === 'general' && joined.userCount === 1, 'alice joined');
expect((await alice.next('roomJoined')).userCount === 1, 'roomJoined for alice');

const bob = connect('bob');
await bob.opened;
await bob.next('welcome');
await bob.next('connected');
bob.send({ type: 'setUsername', username: 'bob' });
await bob.next('usernameSet');
bob.send({ type: 'joinRoom', room: 'general' });
joined = await bob.next('userJoined');
expect(joined.user === 'bob' && joined.userCount === 2, 'bob joined');
expect((await bob.next('roomJoined')).room === 'general', 'roomJoined for bob');
expect((await alice.next('userJoined')).user === 'bob', 'alice hears bob join');

const before = Date.now();
alice.send({ type: 'chatMessage', text: 'Hello, Bob!' });
const chat = await bob.next('chatMessage');
expect(chat.user === 'alice' && chat.text === 'Hello, Bob!', 'bob gets the message');
expect(chat.timestamp >= before - 1000 && chat.timestamp <= Date.now() + 1000, 'timestamp in ms');

bob.send({ type: 'typing' });
expect((await alice.next('userTyping')).user === 'bob', 'alice sees bob typing');

alice.send({ type: 'chat', user: 'alice', text: 'lobby hello' });
for (const c of [alice, bob]) {
  const lobby = await c.next('chat');
  expect(lobby.user === 'alice' && lobby.text === 'lobby hello', 'lobby broadcast');
}

const stamp = Date.now();
alice.send({ type: 'ping', timestamp: stamp });
const pong = await alice.next('pong');
expect(pong.timestamp === stamp && typeof pong.serverTime === 'number', 'pong echoes the timestamp');

alice.ws.send('not json at all');
expect((await alice.next('error')).message === 'Invalid message format', 'invalid JSON is reported');

bob.send({ type: 'leaveRoom' });
const left = await alice.next('userLeft');
expect(left.user === 'bob' && left.userCount === 1, 'alice hears bob leave');

alice.ws.close();
bob.ws.close();
clearTimeout(deadline);
console.log('ok');
