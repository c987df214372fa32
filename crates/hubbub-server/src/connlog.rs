//! What a connection's log lines carry, without a span held for the
//! connection's whole life.
//!
//! Every event a connection's task emits carries the connection's `client`
//! id, `peer` address, `endpoint` and, once known, `user`, in a `conn` span,
//! as the house style asks. A span that lives as long as the connection
//! costs memory for all that time: with `tracing-subscriber`'s registry and
//! fmt layer, about 0.5 KB per idle connection (a registry slot, its
//! extensions map, the formatted fields and their box), a third as much
//! again as all the rest of an idle connection. Most connections log twice
//! (connected, disconnected) in hours.
//!
//! So the connection keeps its fields in a [`LogContext`] of its own, which
//! its task lends to a thread-local while it is polled ([`InConnection`]).
//! [`ConnectionSpans`], wrapped around the binary's subscriber, opens a
//! `conn` span with those fields for each event emitted while one is lent,
//! and closes it after the event: the log lines look as they did, and an
//! idle connection holds no span. Without that wrapper (a program that
//! installs its own subscriber), each connection holds a real `conn` span,
//! as before.

use std::cell::RefCell;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tracing::field::{Value, display};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Span, Subscriber};
use tracing_core::callsite::DefaultCallsite;
use tracing_core::field::FieldSet;
use tracing_core::metadata::Kind;
use tracing_core::span::Current;

use crate::conn::Endpoint;
use crate::link::Peer;

/// The target of a connection's span, as when `conn` made it.
const TARGET: &str = "hubbub_server::conn";

/// The `conn` span's callsite, built by hand as `tracing-log` builds its
/// own (its values go in with `FieldSet::value_set`, as the macros and
/// `tracing-log` do): the span is opened from inside [`ConnectionSpans`],
/// and a `span!` macro there would go back through the dispatcher, which
/// does not answer a nested call while a scoped subscriber is dispatching.
static CONN_CALLSITE: DefaultCallsite = DefaultCallsite::new(&CONN_METADATA);

/// The `conn` span's name, level, target and fields.
static CONN_METADATA: Metadata<'static> = Metadata::new(
    "conn",
    TARGET,
    tracing::Level::INFO,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(&["client", "peer", "endpoint", "user"], tracing_core::identify_callsite!(&CONN_CALLSITE)),
    Kind::SPAN,
);

/// Set once a [`ConnectionSpans`] becomes a dispatcher: from then on new
/// connections lend their fields instead of holding a span.
static SPANS_PER_EVENT: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The fields of the connection whose task this thread is polling.
    static CURRENT: RefCell<Option<ConnFields>> = const { RefCell::new(None) };
}

/// What every log line of a connection says about it.
pub(crate) struct ConnFields {
    /// The connection's queue, for its id.
    peer: Peer,
    /// The name the client set or its token proved, once known.
    user: Option<Arc<str>>,
    /// The client's address.
    ip: IpAddr,
    /// Which endpoint the connection came in on.
    endpoint: Endpoint,
}

impl ConnFields {
    /// Calls `f` with the `conn` span's attributes for these fields.
    fn attributes<R>(&self, f: impl FnOnce(&Attributes<'_>) -> R) -> R {
        let fields = CONN_METADATA.fields();
        let field = |name| fields.field(name).expect("CONN_METADATA names every field this asks for");
        let client = display(self.peer.id());
        let peer = display(self.ip);
        let endpoint = self.endpoint.name();
        let user = self.user.as_deref();
        let (client_field, peer_field, endpoint_field, user_field) =
            (field("client"), field("peer"), field("endpoint"), field("user"));
        let values = [
            (&client_field, Some(&client as &dyn Value)),
            (&peer_field, Some(&peer as &dyn Value)),
            (&endpoint_field, Some(&endpoint as &dyn Value)),
            (&user_field, user.as_ref().map(|user| user as &dyn Value)),
        ];
        let values = fields.value_set(&values);
        f(&Attributes::new_root(&CONN_METADATA, &values))
    }
}

/// Where a connection's log context is.
pub(crate) enum LogContext {
    /// The connection's own fields, lent to [`CURRENT`] while its task runs.
    Fields(ConnFields),
    /// A real span, when no [`ConnectionSpans`] is installed. (Boxed: in
    /// place it would make every connection's task 8 bytes larger, and
    /// 640 bytes is as much as an idle chat connection's task can take
    /// without going up a size; see `http`'s test.)
    Span(Box<Span>),
    /// The fields are lent out (in [`CURRENT`]).
    Lent,
}

impl LogContext {
    /// The log context of a new connection.
    pub(crate) fn new(peer: &Peer, ip: IpAddr, endpoint: Endpoint) -> Self {
        Self::with_spans_per_event(SPANS_PER_EVENT.load(Ordering::Acquire), peer, ip, endpoint)
    }

    /// The log context of a new connection: its fields, or (without
    /// `spans_per_event`) a span that lives as long as it.
    fn with_spans_per_event(spans_per_event: bool, peer: &Peer, ip: IpAddr, endpoint: Endpoint) -> Self {
        if spans_per_event {
            Self::Fields(ConnFields { peer: peer.clone(), user: None, ip, endpoint })
        } else {
            Self::Span(Box::new(tracing::info_span!(
                target: TARGET,
                "conn",
                client = %peer.id(),
                peer = %ip,
                endpoint = endpoint.name(),
                user = tracing::field::Empty
            )))
        }
    }

    /// Runs `f` with this connection's context: what it logs carries the
    /// connection's fields.
    pub(crate) fn scope<R>(&mut self, f: impl FnOnce() -> R) -> R {
        if let Self::Span(span) = self {
            return span.in_scope(f);
        }
        let _lent = Lend::new(self);
        f()
    }
}

/// Records the connection's user on the log context in scope (see
/// [`LogContext::scope`]): the lines it logs from now on carry it.
pub(crate) fn record_user(user: &Arc<str>) {
    let lent = CURRENT
        .try_with(|current| match current.try_borrow_mut().as_deref_mut() {
            Ok(Some(fields)) => {
                fields.user = Some(user.clone());
                true
            }
            _ => false,
        })
        .unwrap_or(false);
    if !lent {
        Span::current().record("user", &**user);
    }
}

/// Calls `f` with the fields of the connection being polled on this thread,
/// if any.
fn with_current<R>(f: impl FnOnce(&ConnFields) -> R) -> Option<R> {
    CURRENT.try_with(|current| current.try_borrow().ok()?.as_ref().map(f)).ok().flatten()
}

/// The fields of a [`LogContext`], lent to [`CURRENT`] until this is
/// dropped (a panic included), which gives them back.
struct Lend<'a> {
    /// Where the fields go back to.
    context: &'a mut LogContext,
    /// What [`CURRENT`] held before.
    previous: Option<ConnFields>,
}

impl<'a> Lend<'a> {
    fn new(context: &'a mut LogContext) -> Self {
        let previous = match std::mem::replace(context, LogContext::Lent) {
            LogContext::Fields(fields) => CURRENT.replace(Some(fields)),
            // Nothing to lend (the fields are out already, or this is a
            // span): nothing is in scope meanwhile, and the drop puts back
            // what was.
            other => {
                *context = other;
                CURRENT.take()
            }
        };
        Self { context, previous }
    }
}

impl Drop for Lend<'_> {
    fn drop(&mut self) {
        if let Some(fields) = CURRENT.replace(self.previous.take()) {
            *self.context = LogContext::Fields(fields);
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's future, polled with the connection's [`LogContext`]
    /// in scope (as `tracing::Instrument` does with a span).
    pub(crate) struct InConnection<F> {
        context: LogContext,
        #[pin]
        future: F,
    }
}

impl<F> InConnection<F> {
    /// Runs `future` in `context`.
    pub(crate) fn new(context: LogContext, future: F) -> Self {
        Self { context, future }
    }
}

impl<F: Future> Future for InConnection<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        this.context.scope(|| future.poll(cx))
    }
}

/// A [`Subscriber`] that puts every event a Hubbub connection emits in a
/// `conn` span with the connection's `client` id, `peer` address, `endpoint`
/// and (once known) `user`, as the connection's own span would, but opened
/// for the event and closed after it: an idle connection holds no span.
///
/// Wrap the subscriber before installing it. The events of a connection are
/// then in its `conn` span whatever their level; with a subscriber that is
/// not wrapped, each connection holds a `conn` span at `INFO` for its whole
/// life instead.
///
/// ```
/// use tracing_subscriber::util::SubscriberInitExt as _;
///
/// let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).finish();
/// hubbub_server::ConnectionSpans::new(logs).init();
/// ```
#[derive(Debug)]
pub struct ConnectionSpans<S> {
    /// The subscriber that records everything, the `conn` spans included.
    inner: S,
}

impl<S: Subscriber> ConnectionSpans<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        // Registered now, so that filters see the `conn` callsite as they
        // see the others when the dispatcher is made.
        CONN_CALLSITE.register();
        Self { inner }
    }

    /// Hands `event` to the inner subscriber inside the `conn` span of
    /// `connection`.
    fn event_in(&self, connection: &ConnFields, event: &Event<'_>) {
        let id = connection.attributes(|attributes| self.inner.new_span(attributes));
        self.inner.enter(&id);
        self.inner.event(event);
        self.inner.exit(&id);
        self.inner.try_close(id);
    }
}

impl<S: Subscriber> Subscriber for ConnectionSpans<S> {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        SPANS_PER_EVENT.store(true, Ordering::Release);
        self.inner.on_register_dispatch(subscriber);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        self.inner.new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner.record(span, values);
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows);
    }

    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.inner.event_enabled(event)
    }

    fn event(&self, event: &Event<'_>) {
        // An event inside a span (none is opened within a connection
        // today) or with an explicit parent keeps the span it has.
        let in_connection = event.is_contextual()
            && with_current(|connection| {
                if self.inner.current_span().id().is_some() {
                    return false;
                }
                self.event_in(connection, event);
                true
            })
            .unwrap_or(false);
        if !in_connection {
            self.inner.event(event);
        }
    }

    fn enter(&self, span: &Id) {
        self.inner.enter(span);
    }

    fn exit(&self, span: &Id) {
        self.inner.exit(span);
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }

    fn current_span(&self) -> Current {
        self.inner.current_span()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use futures_util::FutureExt as _;
    use tracing_subscriber::Layer;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::deflate::Deflate;

    /// Formatted lines, kept for the test to read.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        /// Every line written so far, taken.
        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            String::from_utf8(bytes).unwrap().lines().map(str::to_owned).collect()
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Lines {
        type Writer = Self;

        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    /// Counts the spans open, in the subscriber's registry.
    struct OpenSpans(Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for OpenSpans {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }

        fn on_close(&self, _: Id, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A text subscriber without time or colour writing to `lines`, that
    /// counts its open spans in `open`.
    fn subscriber(lines: &Lines, open: &Arc<AtomicUsize>) -> impl Subscriber + Send + Sync + use<> {
        tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .without_time()
            .with_ansi(false)
            .finish()
            .with(OpenSpans(open.clone()))
    }

    fn peer() -> Peer {
        Peer::new(8, 1 << 16, Deflate::OFF)
    }

    #[test]
    fn a_connections_events_carry_its_span_and_no_span_outlives_an_event() {
        let (lines, open) = (Lines::default(), Arc::new(AtomicUsize::new(0)));
        let _default = tracing::subscriber::set_default(ConnectionSpans::new(subscriber(&lines, &open)));
        let peer = peer();
        let mut log =
            LogContext::with_spans_per_event(true, &peer, "192.0.2.7".parse().unwrap(), Endpoint::Chat);
        let prefix = format!("conn{{client={} peer=192.0.2.7 endpoint=\"chat\"", peer.id());

        log.scope(|| tracing::info!("connected"));
        let got = lines.take();
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].contains(&format!("{prefix}}}: hubbub_server::connlog::tests: connected")),
            "{got:#?}"
        );

        // The user, once known, is on every later line, whatever its level;
        // the connection's task lends its fields while it is polled.
        log.scope(|| record_user(&Arc::from("ada")));
        let task = InConnection::new(log, async {
            tracing::warn!(cause = "test", "flooding");
        });
        task.now_or_never().unwrap();
        let got = lines.take();
        assert!(got[0].contains(&format!("{prefix} user=\"ada\"}}: ")), "{got:#?}");
        assert!(got[0].ends_with("flooding cause=\"test\""), "{got:#?}");

        // Outside a connection, no span; none was left open.
        tracing::info!("elsewhere");
        let got = lines.take();
        assert!(!got[0].contains("conn{"), "{got:#?}");
        assert_eq!(open.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn without_connection_spans_each_connection_holds_its_own_span() {
        let (lines, open) = (Lines::default(), Arc::new(AtomicUsize::new(0)));
        let _default = tracing::subscriber::set_default(subscriber(&lines, &open));
        let peer = peer();
        let mut log =
            LogContext::with_spans_per_event(false, &peer, "192.0.2.7".parse().unwrap(), Endpoint::Echo);
        log.scope(|| {
            record_user(&Arc::from("bob"));
            tracing::info!("connected");
        });
        let got = lines.take();
        let expected =
            format!("conn{{client={} peer=192.0.2.7 endpoint=\"echo\" user=\"bob\"}}: ", peer.id());
        assert!(got[0].contains(&expected), "{got:#?}");
        assert_eq!(open.load(Ordering::SeqCst), 1, "the span lives as long as the connection");
        drop(log);
        assert_eq!(open.load(Ordering::SeqCst), 0);
    }
}
