//! The client crate against real sockets on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hubbub_client::{HeartbeatConfig, LinkEvent, LinkMonitor};
use hubbub_protocol::{ClientMessage, ServerMessage, decode_server};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A fake server that answers the first `answered` app-level pings with a
/// `pong`, then keeps the connection open but answers nothing.
async fn fake_server(answered: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let mut seen = 0;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let ping = decode_client(&text);
            if let ClientMessage::Ping { timestamp } = ping {
                seen += 1;
                if seen <= answered {
                    let pong = ServerMessage::Pong { timestamp, server_time: 0 };
                    ws.send(Message::text(pong.to_json())).await.unwrap();
                }
            }
        }
    });
    url
}

fn decode_client(text: &str) -> ClientMessage {
    hubbub_protocol::decode_client(text, &hubbub_protocol::Limits::default()).unwrap()
}

#[tokio::test]
async fn the_monitor_declares_the_link_dead_when_pongs_stop() {
    let url = fake_server(3).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let config = HeartbeatConfig { interval: Duration::from_millis(50), timeout: Duration::from_millis(200) };
    let mut link = LinkMonitor::new(config);
    let mut pings = 0;
    let verdict = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                event = link.next_event() => match event {
                    LinkEvent::SendPing(ping) => {
                        pings += 1;
                        ws.send(Message::text(ping.to_json())).await.unwrap();
                    }
                    LinkEvent::Dead => return,
                },
                Some(Ok(Message::Text(text))) = ws.next() => {
                    link.on_message(&decode_server(&text).unwrap());
                }
            }
        }
    })
    .await;
    assert!(verdict.is_ok(), "the dead link was noticed");
    assert_eq!(pings, 4, "three pings answered, the fourth never");
    let latency = link.latency().expect("answered pings were measured");
    assert!(latency.last < Duration::from_millis(200));
}
