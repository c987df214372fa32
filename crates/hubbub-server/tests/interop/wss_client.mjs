// A Node `ws` client over TLS that trusts the test's self-signed certificate,
// run by crates/hubbub-server/tests/server.rs. It joins room "tls", says
// hello, waits for a reply from the room, prints "ok" and exits 0.
import { readFileSync } from 'node:fs';
import WebSocket from 'ws';

const [url, caFile] = process.argv.slice(2);
const ws = new WebSocket(url, { ca: readFileSync(caFile) });
const timer = setTimeout(() => {
  console.error('timed out');
  process.exit(1);
}, 15_000);
ws.on('error', (err) => {
  console.error(err.message);
  process.exit(1);
});
ws.on('open', () => {
  ws.send(JSON.stringify({ type: 'setUsername', username: 'node' }));
  ws.send(JSON.stringify({ type: 'joinRoom', room: 'tls' }));
});
ws.on('message', (data) => {
  const msg = JSON.parse(data.toString());
  if (msg.type === 'roomJoined') {
    ws.send(JSON.stringify({ type: 'chatMessage', text: 'hello over TLS' }));
  } else if (msg.type === 'chatMessage' && msg.user === 'ada') {
    clearTimeout(timer);
    console.log('ok');
    ws.close();
    process.exit(0);
  }
});
