//! Property tests for the codec: every message survives an encode/decode
//! round trip, and no input, however malformed, makes decoding panic.

#![allow(clippy::unwrap_used)]

use hubbub_protocol::{
    ClientMessage, ClientMsgId, Limits, Number, ServerMessage, decode_client, decode_server, is_bidi_control,
};
use proptest::prelude::*;
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes, backslashes and control characters.
    ".{0,40}"
}

/// Names that pass validation unchanged: trimmed, no control characters,
/// no bidirectional controls (which validation removes), non-empty.
fn valid_name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[^\\p{{Cc}}\\s][^\\p{{Cc}}]{{0,{}}}", max - 2))
        .unwrap()
        .prop_map(|s| s.chars().filter(|c| !is_bidi_control(*c)).collect::<String>().trim().to_owned())
        .prop_filter("non-empty after trim", |s| !s.is_empty())
}

/// A UUID in any spelling a client may use: hyphenated or simple, braced,
/// a URN, in any mix of cases.
fn client_msg_id() -> impl Strategy<Value = ClientMsgId> {
    (any::<u128>(), 0..4_u8, any::<u64>()).prop_map(|(n, form, case)| {
        let uuid = Uuid::from_u128(n);
        let text = match form {
            0 => uuid.hyphenated().to_string(),
            1 => uuid.simple().to_string(),
            2 => uuid.braced().to_string(),
            _ => uuid.urn().to_string(),
        };
        // Upper-case some of the hex digits (never the `urn:uuid:` prefix,
        // which the parser takes only in lower case).
        let prefix = if form == 3 { "urn:uuid:".len() } else { 0 };
        let spelled: String = text
            .char_indices()
            .map(|(i, c)| if i >= prefix && case >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
            .collect();
        ClientMsgId::parse(&spelled).unwrap()
    })
}

fn id_option() -> impl Strategy<Value = Option<ClientMsgId>> {
    proptest::option::of(client_msg_id())
}

/// Every bidirectional control character.
const BIDI_CONTROLS: &[char] = &[
    '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<u64>().prop_map(Number::from),
        any::<i64>().prop_map(Number::from),
        (-1e15f64..1e15).prop_map(|f| Number::from_f64(f).unwrap()),
    ]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        text().prop_map(|username| ClientMessage::SetUsername { username }),
        (text(), proptest::option::of((text(), any::<u64>()))).prop_map(|(room, since)| {
            ClientMessage::JoinRoom {
                room,
                since: since.map(|(epoch, offset)| hubbub_protocol::Since { epoch, offset }),
            }
        }),
        (any::<Option<u64>>(), any::<Option<u32>>())
            .prop_map(|(before, limit)| ClientMessage::History { before, limit }),
        Just(ClientMessage::LeaveRoom {}),
        (text(), id_option())
            .prop_map(|(text, client_msg_id)| ClientMessage::ChatMessage { text, client_msg_id }),
        Just(ClientMessage::Typing {}),
        (proptest::option::of(text()), text()).prop_map(|(user, text)| ClientMessage::Chat { user, text }),
        number().prop_map(|timestamp| ClientMessage::Ping { timestamp }),
        (
            text(),
            any::<u64>(),
            text(),
            proptest::option::of(text()),
            any::<Option<u32>>(),
            proptest::option::of(text())
        )
            .prop_map(|(name, size, mime_type, sha256, chunk_size, transfer_id)| {
                ClientMessage::FileStart { name, size, mime_type, sha256, chunk_size, transfer_id }
            }),
        proptest::option::of(text()).prop_map(|transfer_id| ClientMessage::FileEnd { transfer_id }),
        text().prop_map(|transfer_id| ClientMessage::FileResume { transfer_id }),
        text().prop_map(|token| ClientMessage::Auth { token }),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let count = 0usize..100_000;
    prop_oneof![
        text().prop_map(|message| ServerMessage::Welcome { message }),
        any::<u128>().prop_map(|n| ServerMessage::Connected { client_id: Uuid::from_u128(n) }),
        (text(), proptest::option::of(text()), any::<Option<u64>>()).prop_map(
            |(message, code, retry_after_ms)| ServerMessage::Error { message, code, retry_after_ms }
        ),
        text().prop_map(|username| ServerMessage::UsernameSet { username }),
        (text(), text(), count.clone()).prop_map(|(user, room, user_count)| ServerMessage::UserJoined {
            user,
            room,
            user_count
        }),
        (
            text(),
            count.clone(),
            proptest::option::of(text()),
            any::<Option<u64>>(),
            any::<Option<bool>>(),
            any::<Option<u64>>()
        )
            .prop_map(|(room, user_count, epoch, offset, recovered, missed)| {
                ServerMessage::RoomJoined { room, user_count, epoch, offset, recovered, missed }
            }),
        (text(), text(), proptest::collection::vec(text(), 0..3), any::<bool>()).prop_map(
            |(room, epoch, texts, has_more)| ServerMessage::History {
                room,
                epoch,
                messages: texts.into_iter().map(serde_json::Value::from).collect(),
                has_more
            }
        ),
        (text(), count, proptest::option::of(text()))
            .prop_map(|(user, user_count, room)| ServerMessage::UserLeft { user, user_count, room }),
        text().prop_map(|room| ServerMessage::RoomLeft { room }),
        (text(), text(), text()).prop_map(|(user, previous, room)| ServerMessage::UserRenamed {
            user,
            previous,
            room
        }),
        (text(), text(), any::<u64>(), id_option(), any::<Option<u64>>()).prop_map(
            |(user, text, timestamp, client_msg_id, offset)| {
                ServerMessage::ChatMessage { user, text, timestamp, client_msg_id, offset }
            }
        ),
        (client_msg_id(), any::<u64>(), any::<Option<u64>>()).prop_map(
            |(client_msg_id, timestamp, offset)| {
                ServerMessage::MessageAck { client_msg_id, timestamp, offset }
            }
        ),
        text().prop_map(|user| ServerMessage::UserTyping { user }),
        (text(), text()).prop_map(|(user, text)| ServerMessage::Chat { user, text }),
        (number(), any::<u64>())
            .prop_map(|(timestamp, server_time)| ServerMessage::Pong { timestamp, server_time }),
        (text(), any::<u32>(), any::<u64>()).prop_map(|(transfer_id, chunk_size, max_size)| {
            ServerMessage::FileAccepted { transfer_id, chunk_size, max_size }
        }),
        (proptest::option::of(text()), text())
            .prop_map(|(transfer_id, message)| ServerMessage::FileError { transfer_id, message }),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(transfer_id, received_bytes, size)| {
            ServerMessage::FileProgress { transfer_id, received_bytes, size }
        }),
        (text(), text(), any::<u64>(), text(), text(), text()).prop_map(
            |(file_id, name, size, mime_type, sha256, transfer_id)| ServerMessage::FileSaved {
                url: format!("/files/{file_id}"),
                file_id,
                name,
                size,
                mime_type,
                sha256,
                transfer_id,
                offset: None
            }
        ),
        (text(), text(), text(), any::<u64>(), text(), any::<Option<u64>>()).prop_map(
            |(user, file_id, name, size, mime_type, offset)| {
                ServerMessage::FileShared {
                    user,
                    url: format!("/files/{file_id}"),
                    file_id,
                    name,
                    size,
                    mime_type,
                    offset,
                }
            }
        ),
        (text(), any::<u32>(), proptest::collection::vec(any::<[u32; 2]>(), 0..5)).prop_map(
            |(transfer_id, chunk_size, received_chunks)| ServerMessage::FileResumeState {
                transfer_id,
                chunk_size,
                received_chunks
            }
        ),
        (text(), any::<u64>())
            .prop_map(|(user, expires_at)| ServerMessage::Authenticated { user, expires_at }),
        any::<u64>().prop_map(|expires_at| ServerMessage::AuthExpiring { expires_at }),
        text().prop_map(|room| ServerMessage::RoomCreated { room }),
        text().prop_map(|room| ServerMessage::RoomRemoved { room }),
        text().prop_map(|message| ServerMessage::ServerShutdown { message }),
    ]
}

/// Arbitrary JSON values, nested a few levels.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop_oneof![text(), proptest::sample::select(ClientMessage::TYPES).prop_map(str::to_owned),]
            .prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("text".to_owned()),
                    Just("room".to_owned()),
                    text()
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        let json = msg.to_json();
        let back: ClientMessage = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn client_msg_ids_round_trip_spelled_as_sent(id in client_msg_id()) {
        let json = serde_json::to_string(&id).unwrap();
        let back: ClientMsgId = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.as_str(), id.as_str());
        prop_assert_eq!(back, id);
        // Through a whole message and its validation, too.
        let sent = ClientMessage::ChatMessage { text: "hi".into(), client_msg_id: Some(id) };
        let decoded = decode_client(&sent.to_json(), &Limits::default()).unwrap();
        let ClientMessage::ChatMessage { client_msg_id: Some(decoded), .. } = decoded else {
            panic!("not a chatMessage with an id: {decoded:?}");
        };
        prop_assert_eq!(decoded.as_str(), id.as_str());
        let ack = ServerMessage::MessageAck { client_msg_id: decoded, timestamp: 1, offset: Some(1) }.to_json();
        prop_assert!(ack.contains(&format!("\"clientMsgId\":\"{}\"", id.as_str())), "{}", ack);
    }

    #[test]
    fn client_msg_ids_parse_exactly_what_uuid_parses(text in "[0-9a-fA-F{}urn:id-]{0,48}") {
        match ClientMsgId::parse(&text) {
            Ok(id) => {
                prop_assert_eq!(id.as_str(), text.as_str());
                prop_assert_eq!(Some(id.uuid()), Uuid::try_parse(&text).ok());
            }
            Err(_) => prop_assert!(Uuid::try_parse(&text).is_err()),
        }
    }

    #[test]
    fn server_messages_round_trip(msg in server_message()) {
        let json = msg.to_json();
        prop_assert_eq!(decode_server(&json).unwrap(), msg);
    }

    #[test]
    fn valid_messages_pass_validation_unchanged(
        username in valid_name(32),
        room in valid_name(64),
        text in "[a-z ]{0,10}[a-z][a-z \n]{0,100}",
    ) {
        let limits = Limits::default();
        for msg in [
            ClientMessage::SetUsername { username: username.clone() },
            ClientMessage::JoinRoom { room, since: Some(hubbub_protocol::Since { epoch: "e1".into(), offset: 7 }) },
            ClientMessage::History { before: Some(10), limit: Some(100) },
            ClientMessage::ChatMessage { text: text.clone(), client_msg_id: None },
            ClientMessage::Chat { user: Some(username), text },
        ] {
            prop_assert_eq!(decode_client(&msg.to_json(), &limits).unwrap(), msg);
        }
    }

    #[test]
    fn names_decode_the_same_with_bidi_controls_sprinkled_in(
        name in valid_name(32),
        controls in proptest::collection::vec(
            (any::<proptest::sample::Index>(), proptest::sample::select(BIDI_CONTROLS)),
            1..6,
        ),
    ) {
        let mut sprinkled: Vec<char> = name.chars().collect();
        for (at, c) in controls {
            sprinkled.insert(at.index(sprinkled.len() + 1), c);
        }
        let sprinkled: String = sprinkled.into_iter().collect();
        let limits = Limits::default();
        prop_assert_eq!(limits.username(sprinkled.clone()).unwrap(), name.clone());
        prop_assert_eq!(limits.room(sprinkled.clone()).unwrap(), name.clone());
        prop_assert_eq!(limits.file_name(sprinkled).unwrap(), name);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = decode_client(&text, &Limits::default());
        let _ = decode_server(&text);
        let _ = hubbub_protocol::chunk::split(&bytes);
    }

    #[test]
    fn decoding_arbitrary_json_never_panics_and_errors_are_reportable(value in json()) {
        let text = value.to_string();
        match decode_client(&text, &Limits::default()) {
            Ok(msg) => prop_assert!(ClientMessage::TYPES.contains(&msg.kind())),
            Err(err) => {
                // Every refusal turns into an `error` event a client can read.
                let event = err.to_event();
                let decoded = decode_server(&event.to_json());
                prop_assert!(matches!(decoded, Ok(ServerMessage::Error { .. })), "{:?}", decoded);
                if !value.is_object() {
                    prop_assert_eq!(err.to_string(), "Invalid message format");
                }
            }
        }
    }
}
