//! Property tests: random event sequences in virtual time, and the token codec.

use std::time::{Duration, Instant};

use hubbub_heartbeat::{Action, Heartbeat, HeartbeatConfig, HeartbeatTable, decode_token, encode_token};
use proptest::prelude::*;

const NS: Duration = Duration::from_nanos(1);

/// Something that can happen to a connection, or the passing of time.
#[derive(Debug, Clone)]
enum Event {
    /// Time passes, in milliseconds.
    Advance(u64),
    /// Time jumps to exactly `poll_timeout`, where boundaries hide.
    AdvanceToTimeout,
    /// The driver asks what to do.
    Poll,
    /// The driver reports the outstanding ping as written now.
    PingWritten,
    /// The pong for the most recent ping arrives.
    Pong,
    /// A pong for a ping this many pings older than the most recent arrives.
    StalePong(u64),
    /// A pong with a token that was never sent arrives.
    UnknownPong(u64),
    /// Some other frame arrives.
    Frame,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..60u64).prop_map(Event::Advance),
        2 => Just(Event::AdvanceToTimeout),
        4 => Just(Event::Poll),
        1 => Just(Event::PingWritten),
        2 => Just(Event::Pong),
        1 => (1..4u64).prop_map(Event::StalePong),
        1 => (1_000_000..u64::MAX).prop_map(Event::UnknownPong),
        1 => Just(Event::Frame),
    ]
}

/// What the test knows independently of the machine.
struct Model {
    /// The most recent ping's token.
    last_token: Option<u64>,
    /// When the most recent ping counts as sent.
    sent_at: Instant,
    /// Whether the most recent ping still awaits its pong.
    waiting: bool,
}

/// `poll_action` answers `None` strictly before `poll_timeout` and something
/// from it on; with no timeout the peer is dead and `poll_action` says so.
fn check_poll_timeout(heartbeat: &Heartbeat, now: Instant) -> Result<(), TestCaseError> {
    let mut probe = heartbeat.clone();
    match heartbeat.poll_timeout() {
        Some(at) => {
            if at > now {
                prop_assert_eq!(probe.poll_action(now), None);
                prop_assert_eq!(probe.poll_action(at - NS), None);
            }
            prop_assert!(probe.poll_action(at.max(now)).is_some());
        }
        None => {
            prop_assert!(heartbeat.is_dead());
            prop_assert_eq!(probe.poll_action(now), Some(Action::PeerDead));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_event_sequences_keep_the_invariants(
        interval_ms in 1..50u64,
        timeout_ms in 1..50u64,
        events in prop::collection::vec(event(), 0..200),
    ) {
        let config = HeartbeatConfig {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut heartbeat = Heartbeat::new(config, t0);
        let mut model = Model { last_token: None, sent_at: t0, waiting: false };

        for event in events {
            check_poll_timeout(&heartbeat, now)?;
            let was_dead = heartbeat.is_dead();
            let overdue = model.waiting && now >= model.sent_at + config.timeout;
            let before = (heartbeat.poll_timeout(), heartbeat.latency());
            match event {
                Event::Advance(ms) => now += Duration::from_millis(ms),
                Event::AdvanceToTimeout => {
                    if let Some(at) = heartbeat.poll_timeout() {
                        now = now.max(at);
                    }
                }
                Event::Poll => match heartbeat.poll_action(now) {
                    Some(Action::SendPing(token)) => {
                        // One ping at a time, spaced by the interval, with
                        // fresh tokens.
                        prop_assert!(!model.waiting);
                        let base = if model.last_token.is_some() { model.sent_at } else { t0 };
                        prop_assert!(now >= base + config.interval);
                        prop_assert!(model.last_token.is_none_or(|last| token > last));
                        model = Model { last_token: Some(token), sent_at: now, waiting: true };
                    }
                    Some(Action::PeerDead) => prop_assert!(was_dead || overdue),
                    None => prop_assert!(!was_dead && !overdue),
                },
                Event::PingWritten => {
                    heartbeat.on_ping_sent(now);
                    if model.waiting && !was_dead && now > model.sent_at {
                        model.sent_at = now;
                    }
                }
                Event::Pong => {
                    if let Some(token) = model.last_token {
                        heartbeat.on_pong(now, token);
                        if model.waiting && !heartbeat.is_dead() {
                            // Accepted: only in time, measured from the send.
                            prop_assert!(!overdue);
                            let latency = heartbeat.latency().expect("a pong was accepted");
                            prop_assert_eq!(latency.last, now - model.sent_at);
                            model.waiting = false;
                        }
                    }
                }
                Event::StalePong(back) | Event::UnknownPong(back) => {
                    let token = match (&event, model.last_token) {
                        (Event::StalePong(_), Some(last)) => last.wrapping_sub(back),
                        _ => back,
                    };
                    heartbeat.on_pong(now, token);
                    prop_assert_eq!(heartbeat.last_activity(), Some(now));
                    if !overdue {
                        prop_assert_eq!((heartbeat.poll_timeout(), heartbeat.latency()), before);
                    }
                }
                Event::Frame => {
                    heartbeat.on_frame_received(now);
                    prop_assert_eq!(heartbeat.last_activity(), Some(now));
                    prop_assert_eq!((heartbeat.poll_timeout(), heartbeat.latency()), before);
                }
            }
            // Death is final, and only for a ping left unanswered too long.
            if was_dead {
                prop_assert!(heartbeat.is_dead());
            } else if heartbeat.is_dead() {
                prop_assert!(overdue);
            }
            if let Some(latency) = heartbeat.latency() {
                prop_assert!(latency.smoothed < config.timeout);
            }
        }
        check_poll_timeout(&heartbeat, now)?;
    }

    /// The table runs the same rules as the machine: driven by the same
    /// events on whole milliseconds, one peer in a table asks for the same
    /// pings and dies at the same sweep, and accepts the same pongs.
    #[test]
    fn a_table_entry_behaves_like_a_heartbeat(
        interval_ms in 1..50u64,
        timeout_ms in 1..50u64,
        events in prop::collection::vec(event(), 0..200),
    ) {
        let config = HeartbeatConfig {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut heartbeat = Heartbeat::new(config, t0);
        let mut table = HeartbeatTable::new(config, t0);
        let key = table.insert((), t0);
        let mut last_token = None;
        // The ping awaiting its pong, and when it was sent.
        let mut outstanding = None;
        // Whether the machine has said the peer is dead.
        let mut reported_dead = false;
        for event in events {
            match event {
                Event::Advance(ms) => now += Duration::from_millis(ms),
                Event::AdvanceToTimeout => {
                    if let Some(at) = heartbeat.poll_timeout() {
                        now = now.max(at);
                    }
                }
                Event::Poll | Event::PingWritten | Event::Frame => {
                    let expected = match heartbeat.poll_action(now) {
                        // The table says it once; the machine every time.
                        Some(Action::PeerDead) if reported_dead => None,
                        other => other,
                    };
                    reported_dead |= expected == Some(Action::PeerDead);
                    match expected {
                        Some(Action::SendPing(token)) => {
                            last_token = Some(token);
                            outstanding = Some((token, now));
                        }
                        Some(Action::PeerDead) => outstanding = None,
                        None => {}
                    }
                    let actions: Vec<_> = table.sweep(now).map(|(_, action)| action).collect();
                    prop_assert_eq!(actions, Vec::from_iter(expected));
                }
                Event::Pong | Event::StalePong(_) | Event::UnknownPong(_) => {
                    let token = match (event, last_token) {
                        (Event::Pong, Some(last)) => last,
                        (Event::StalePong(back), Some(last)) => last.wrapping_sub(back),
                        (Event::UnknownPong(token), _) => token,
                        _ => continue,
                    };
                    let answers = outstanding.filter(|&(expected, sent)| expected == token && now < sent + config.timeout);
                    heartbeat.on_pong(now, token);
                    let rtt = table.on_pong(key, now, token);
                    match answers {
                        Some((_, sent)) => {
                            outstanding = None;
                            prop_assert_eq!(rtt, Some(now - sent));
                            prop_assert_eq!(heartbeat.latency().map(|l| l.last), rtt);
                            prop_assert!(!heartbeat.is_dead());
                        }
                        None => prop_assert_eq!(rtt, None),
                    }
                }
            }
        }
    }

    #[test]
    fn tokens_round_trip(token: u64) {
        prop_assert_eq!(decode_token(&encode_token(token)), Some(token));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(payload in prop::collection::vec(any::<u8>(), 0..16)) {
        prop_assert_eq!(decode_token(&payload).is_some(), payload.len() == 8);
    }
}
