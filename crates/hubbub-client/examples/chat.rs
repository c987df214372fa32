//! The common case: connect, pick a name, join a room, say hello, and print
//! what the room says, riding out server restarts.
//!
//! ```sh
//! cargo run -p hubbub-client --example chat -- ws://localhost:8080/ws/chat ada
//! ```

#![allow(clippy::print_stdout)]

use hubbub_client::{Client, ClientConfig, Event, ReconnectPolicy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://localhost:8080/ws/chat".to_owned());
    let name = args.next().unwrap_or_else(|| "ada".to_owned());

    // Keep trying for as long as it takes, at most 30 s apart.
    let config = ClientConfig {
        reconnect: ReconnectPolicy { max_attempts: None, ..ReconnectPolicy::default() },
        ..ClientConfig::default()
    };
    let (client, mut events) = Client::connect(url, config).await?;
    client.set_username(name).await?;
    client.join_room("general").await?;
    let hello = client.send_message("Hello, everyone!").await?;

    while let Some(event) = events.recv().await {
        match event {
            Event::Connected { client_id, url } => println!("* connected to {url} as {client_id}"),
            Event::RoomJoined { room, user_count, .. } => println!("* in #{room} with {user_count}"),
            Event::Message { user, text, .. } => println!("{user}: {text}"),
            Event::MessageAcked { client_msg_id, .. } if client_msg_id == hello => {
                println!("* the room got our hello");
            }
            Event::UserJoined { user, .. } => println!("* {user} joined"),
            Event::UserLeft { user, .. } => println!("* {user} left"),
            Event::Reconnecting { attempt, delay } => {
                println!("* connection lost; attempt {attempt} in {delay:?}");
            }
            Event::Error { message, .. } => println!("* server says: {message}"),
            _ => {}
        }
    }
    Ok(())
}
