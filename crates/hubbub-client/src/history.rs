//! Room history on the client's side: where its copy of each room's stream
//! ends, so that a rejoin asks for what it missed and nothing is delivered
//! twice, and pages of earlier messages.
//!
//! Sans-IO, like the rest of the state: the connection task's
//! [`ClientState`](crate::state::ClientState) feeds [`Streams`] what the
//! server says and asks it what to put in `joinRoom`.

use std::collections::HashMap;

use hubbub_protocol::{ServerMessage, Since};

use crate::Event;

/// How far the client's copy of one room's stream goes: the newest offset
/// it has delivered to the application (or that its own acked messages
/// took), within the epoch it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Position {
    epoch: String,
    offset: u64,
}

/// The client's position in every room it has been in, and which room the
/// current link is in.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    /// Per room. Kept after leaving a room, so that joining it again
    /// recovers what was said meanwhile; one small entry per room joined in
    /// the client's life.
    positions: HashMap<String, Position>,
    /// The room the server has confirmed this link is in (its `roomJoined`
    /// came, its `roomLeft` did not). The server answers commands in order,
    /// so a room message belongs to this room: one from the previous room
    /// can still arrive after `joinRoom` is written, but not after the
    /// `roomJoined` that answers it.
    current: Option<String>,
}

/// What a `roomJoined` meant for the client's copy of the room.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// A first join, a replay to come, or a server without history.
    Fine,
    /// The client asked for what it missed and the server could not replay
    /// it: the room's stream now stands at this epoch and offset.
    RecoveryFailed { epoch: String, offset: u64 },
}

impl Streams {
    /// What to put in `joinRoom` for `room`: where the client's copy of it
    /// ends, if it has one.
    pub(crate) fn since(&self, room: &str) -> Option<Since> {
        self.positions.get(room).map(|p| Since { epoch: p.epoch.clone(), offset: p.offset })
    }

    /// The server confirmed a join. `recovered` is present only when the
    /// join carried `since`.
    pub(crate) fn on_joined(
        &mut self,
        room: &str,
        epoch: Option<String>,
        offset: Option<u64>,
        recovered: Option<bool>,
    ) -> Joined {
        self.current = Some(room.to_owned());
        let (Some(epoch), Some(offset)) = (epoch, offset) else {
            // The server keeps no history for the room: nothing to track.
            self.positions.remove(room);
            return Joined::Fine;
        };
        let known_epoch = self.positions.get(room).map(|p| p.epoch.as_str());
        match recovered {
            // The missed messages follow; they move the position on.
            Some(true) if known_epoch == Some(epoch.as_str()) => Joined::Fine,
            Some(_) => {
                if recovered == Some(true) {
                    // Not what the client asked for; start again from here.
                    tracing::warn!(room, "recovery in an epoch the client did not ask for");
                }
                self.positions.insert(room.to_owned(), Position { epoch: epoch.clone(), offset });
                Joined::RecoveryFailed { epoch, offset }
            }
            None => {
                self.positions.insert(room.to_owned(), Position { epoch, offset });
                Joined::Fine
            }
        }
    }

    /// The server restarted the room's stream (`resync`): the client's copy
    /// is no longer continuous with it, so its position becomes the one
    /// given. Messages above `offset` in `epoch` are news; a rejoin asks
    /// from there.
    pub(crate) fn on_resync(&mut self, room: &str, epoch: String, offset: u64) {
        self.positions.insert(room.to_owned(), Position { epoch, offset });
    }

    /// The server confirmed leaving the room.
    pub(crate) fn on_left(&mut self) {
        self.current = None;
    }

    /// The link is gone; the next one joins again.
    pub(crate) fn on_link_lost(&mut self) {
        self.current = None;
    }

    /// A room message (live or replayed) with its offset: true when it is
    /// news, and from now on counts as delivered; false when a message at
    /// this offset or later was already delivered in this epoch.
    pub(crate) fn deliver(&mut self, offset: Option<u64>) -> bool {
        let (Some(offset), Some(room)) = (offset, &self.current) else { return true };
        let Some(position) = self.positions.get_mut(room) else { return true };
        if offset <= position.offset {
            return false;
        }
        position.offset = offset;
        true
    }

    /// One of the client's own messages, written in `room`, was
    /// acknowledged with `offset`: the client has it, so a replay need not
    /// bring it.
    pub(crate) fn on_ack(&mut self, room: Option<&str>, offset: Option<u64>) {
        if let (Some(room), Some(offset)) = (room, offset)
            && let Some(position) = self.positions.get_mut(room)
        {
            position.offset = position.offset.max(offset);
        }
    }
}

/// A page of a room's earlier messages, the answer to
/// [`Client::history`](crate::Client::history).
///
/// ```
/// use hubbub_client::{Event, HistoryPage};
///
/// let page = HistoryPage {
///     room: "general".into(),
///     epoch: "e1".into(),
///     messages: vec![Event::Message {
///         user: "ada".into(),
///         text: "hi".into(),
///         timestamp: 1,
///         client_msg_id: None,
///         offset: Some(41),
///     }],
///     has_more: true,
/// };
/// // The next page back ends before the oldest message of this one.
/// assert_eq!(page.next_before(), Some(41));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPage {
    /// The room.
    pub room: String,
    /// The room's epoch: the offsets are in it.
    pub epoch: String,
    /// The messages, oldest first: [`Event::Message`]s (the client's own
    /// included) and [`Event::FileShared`]s, as they were delivered live.
    pub messages: Vec<Event>,
    /// Whether the room holds older messages.
    pub has_more: bool,
}

impl HistoryPage {
    /// The `before` that asks for the page before this one: the oldest
    /// message's offset, when there are older messages.
    pub fn next_before(&self) -> Option<u64> {
        if !self.has_more {
            return None;
        }
        self.messages.iter().find_map(offset_of)
    }

    /// The page from the server's `history` answer. Messages that are not
    /// room messages, or that this client cannot read, are left out.
    pub(crate) fn from_reply(
        room: String,
        epoch: String,
        messages: Vec<serde_json::Value>,
        has_more: bool,
    ) -> Self {
        let messages = messages
            .into_iter()
            .filter_map(|value| match serde_json::from_value::<ServerMessage>(value) {
                Ok(msg) => room_event(msg),
                Err(err) => {
                    tracing::debug!(cause = %err, "history message not understood");
                    None
                }
            })
            .collect();
        Self { room, epoch, messages, has_more }
    }
}

/// A kept room message as the application sees it.
pub(crate) fn room_event(msg: ServerMessage) -> Option<Event> {
    match msg {
        ServerMessage::ChatMessage { user, text, timestamp, client_msg_id, offset } => Some(Event::Message {
            user,
            text,
            timestamp,
            // Applications see UUIDs: two spellings of one are one id.
            client_msg_id: client_msg_id.map(|id| id.uuid()),
            offset,
        }),
        ServerMessage::FileShared { user, file_id, name, size, mime_type, url, offset } => {
            Some(Event::FileShared { user, file_id, name, size, mime_type, url, offset })
        }
        _ => None,
    }
}

/// A room message's offset.
fn offset_of(event: &Event) -> Option<u64> {
    match event {
        Event::Message { offset, .. } | Event::FileShared { offset, .. } => *offset,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejoin_asks_from_the_last_delivered_offset_and_drops_what_it_had() {
        let mut streams = Streams::default();
        assert_eq!(streams.since("r"), None);
        assert_eq!(streams.on_joined("r", Some("e".into()), Some(3), None), Joined::Fine);
        assert!(!streams.deliver(Some(3)), "the join's newest was there before");
        assert!(streams.deliver(Some(4)));
        streams.on_ack(Some("r"), Some(5));
        assert!(streams.deliver(None), "no offset, no opinion");
        assert_eq!(streams.since("r"), Some(Since { epoch: "e".into(), offset: 5 }));

        streams.on_link_lost();
        assert_eq!(streams.on_joined("r", Some("e".into()), Some(7), Some(true)), Joined::Fine);
        let delivered: Vec<u64> =
            [4, 5, 6, 7, 6, 8].into_iter().filter(|o| streams.deliver(Some(*o))).collect();
        assert_eq!(delivered, [6, 7, 8]);
    }

    #[test]
    fn a_refused_or_foreign_recovery_starts_again_from_the_server_position() {
        let mut streams = Streams::default();
        streams.on_joined("r", Some("old".into()), Some(2), None);
        let failed = streams.on_joined("r", Some("new".into()), Some(9), Some(false));
        assert_eq!(failed, Joined::RecoveryFailed { epoch: "new".into(), offset: 9 });
        assert_eq!(streams.since("r"), Some(Since { epoch: "new".into(), offset: 9 }));
        let odd = streams.on_joined("r", Some("other".into()), Some(1), Some(true));
        assert_eq!(odd, Joined::RecoveryFailed { epoch: "other".into(), offset: 1 });
        // A server that keeps no history forgets the position.
        assert_eq!(streams.on_joined("r", None, None, None), Joined::Fine);
        assert_eq!(streams.since("r"), None);
    }

    #[test]
    fn a_resync_replaces_the_position_whatever_it_was() {
        let mut streams = Streams::default();
        streams.on_joined("r", Some("old".into()), Some(40), None);
        assert!(streams.deliver(Some(41)));
        // A new epoch that starts lower: its offsets are news above 2 only.
        streams.on_resync("r", "new".into(), 2);
        assert_eq!(streams.since("r"), Some(Since { epoch: "new".into(), offset: 2 }));
        let delivered: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|o| streams.deliver(Some(*o))).collect();
        assert_eq!(delivered, [3, 4]);
        // The same epoch, moved on past what the client had: the gap is not
        // waited for.
        streams.on_resync("r", "new".into(), 10);
        assert!(!streams.deliver(Some(5)));
        assert!(streams.deliver(Some(11)));
        // A room the link is not in gets its position too, for the next join.
        streams.on_resync("elsewhere", "e".into(), 7);
        assert_eq!(streams.since("elsewhere"), Some(Since { epoch: "e".into(), offset: 7 }));
    }

    #[test]
    fn pages_turn_into_events_and_say_where_the_next_one_ends() {
        let messages = vec![
            serde_json::json!({"type":"chatMessage","user":"ada","text":"one","timestamp":5,"offset":7}),
            serde_json::json!({"type":"fileShared","user":"bob","fileId":"f","name":"a.txt","size":1,
                               "mimeType":"text/plain","url":"/files/f","offset":8}),
            serde_json::json!({"type":"userTyping","user":"ada"}),
            serde_json::json!("garbage"),
        ];
        let page = HistoryPage::from_reply("r".into(), "e".into(), messages, true);
        assert_eq!(page.messages.len(), 2);
        assert!(matches!(&page.messages[0], Event::Message { text, offset: Some(7), .. } if text == "one"));
        assert!(matches!(&page.messages[1], Event::FileShared { offset: Some(8), .. }));
        assert_eq!(page.next_before(), Some(7));
        assert_eq!(HistoryPage { has_more: false, ..page }.next_before(), None);
    }
}
