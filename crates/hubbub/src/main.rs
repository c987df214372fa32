//! The `hubbub` binary: read the configuration, set up logging, bind, serve
//! until SIGINT or SIGTERM, exit.
//!
//! Logs go to stderr, coloured only when stderr is a terminal and `NO_COLOR`
//! is unset; the banner of URLs goes to stdout. The subscriber is wrapped in
//! `ConnectionSpans`, which gives a connection's lines its `conn` span.

mod logfmt;
mod print_config;
mod settings;
mod sources;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use hubbub_server::{Config, ConnectionSpans, Server};
use settings::{Action, Cli, LogFormat};
use tracing_subscriber::util::SubscriberInitExt as _;

/// jemalloc packs Tokio's 128-byte-aligned task and registration allocations without the
/// holes glibc's malloc leaves around them (docs/BENCHMARKS.md, idle memory).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::from_env_and_args();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // the one place errors reach the user
            {
                eprintln!("hubbub: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let (config, sources) = match cli.resolve()? {
        Action::Serve { config, sources } => (*config, sources),
        Action::PrintConfig(text) => {
            #[allow(clippy::print_stdout)] // asked for on the command line
            {
                print!("{text}");
            }
            return Ok(());
        }
    };
    let filter = cli.log_filter()?;
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    // ConnectionSpans: a connection's lines carry its `conn` span without
    // each connection holding one (0.5 KB) for its whole life.
    match cli.log_format {
        LogFormat::Text => ConnectionSpans::new(
            logs.fmt_fields(logfmt::escaped_fields())
                .with_ansi(colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")))
                .finish(),
        )
        .init(),
        LogFormat::Json => {
            ConnectionSpans::new(logs.json().with_ansi(false).with_current_span(true).finish()).init()
        }
    }

    let server = Server::new(config.clone()).map_err(|err| sources.refused(&err))?;
    // The server binds metrics.listen once it runs; trying the address now
    // makes a bad one an error that names the key, before the port opens.
    if let (true, Some(metrics)) = (config.metrics.enabled, config.metrics.listen) {
        std::net::TcpListener::bind(metrics)
            .with_context(|| format!("cannot listen on {}", sources.describe("metrics.listen")))?;
    }
    let listen = server.config().listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {}", sources.describe("listen")))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let shutdown = shutdown_signal()?;
    #[allow(clippy::print_stdout)] // the URLs are for the operator, not the log
    {
        print!("{}", banner(addr, server.config(), server.tls().is_some()));
    }
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "listening");
    if let Some(tls) = server.tls().cloned() {
        tokio::spawn(reload_on_sighup(tls));
    }
    server.run(listener, shutdown).await.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Whether log lines are coloured: only on a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The lines printed on stdout once the port is open: every URL the server
/// answers on, as they are with this configuration.
fn banner(addr: SocketAddr, config: &Config, tls: bool) -> String {
    let host = |addr: SocketAddr| {
        if addr.ip().is_unspecified() { format!("localhost:{}", addr.port()) } else { addr.to_string() }
    };
    let main = host(addr);
    let (http, ws) = if tls { ("https", "wss") } else { ("http", "ws") };
    let mut lines = vec![
        format!("Hubbub {} listening on {addr}", env!("CARGO_PKG_VERSION")),
        format!("  chat page      {http}://{main}/"),
        format!("  chat socket    {ws}://{main}/ws/chat  (and {ws}://{main}/)"),
        format!("  notifications  {ws}://{main}/ws/notifications"),
    ];
    if config.echo_enabled {
        lines.push(format!("  echo           {ws}://{main}/ws/echo"));
    }
    lines.push(format!("  health         {http}://{main}/health"));
    lines.push(format!("  status         {http}://{main}/api/status"));
    lines.push(format!("  rooms          {http}://{main}/api/rooms"));
    // The metrics listener is plain HTTP even when the main port is TLS.
    lines.push(match (config.metrics.enabled, config.metrics.listen) {
        (false, _) => "  metrics        off (metrics.enabled = false)".to_owned(),
        (true, None) => format!("  metrics        {http}://{main}/metrics"),
        (true, Some(listen)) if listen.port() == 0 => {
            format!(
                "  metrics        http://{}:PORT/metrics  (metrics.listen: a free port, see the log)",
                listen.ip()
            )
        }
        (true, Some(listen)) => format!("  metrics        http://{}/metrics", host(listen)),
    });
    lines.iter().flat_map(|line| [line.as_str(), "\n"]).collect()
}

/// Reloads the TLS certificate and key on every SIGHUP; on failure the old
/// ones stay in use.
async fn reload_on_sighup(tls: hubbub_server::TlsReloader) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP; TLS certificates will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(err) => {
                    tracing::error!(cause = %err, "TLS reload failed; keeping the previous certificate")
                }
            }
        }
    }
    #[cfg(not(unix))]
    drop(tls);
}

/// Starts listening for SIGINT (Ctrl-C) and SIGTERM at once, so that a
/// signal sent as soon as the banner is out stops the server gracefully;
/// the future completes on either.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!(cause = %err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn the_banner_lists_every_url_as_configured() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let mut config = Config::default();
        let text = banner(addr, &config, false);
        assert!(text.contains("  rooms          http://localhost:8080/api/rooms\n"), "{text}");
        assert!(text.contains("  metrics        http://localhost:8080/metrics\n"), "{text}");
        assert!(text.contains("  echo           ws://localhost:8080/ws/echo\n"), "{text}");
        let text = banner(addr, &config, true);
        assert!(text.contains("  status         https://localhost:8080/api/status\n"), "{text}");
        assert!(text.contains("  metrics        https://localhost:8080/metrics\n"), "{text}");

        config.metrics.listen = Some("127.0.0.1:9090".parse().unwrap());
        config.echo_enabled = false;
        let text = banner(addr, &config, true);
        assert!(text.contains("  metrics        http://127.0.0.1:9090/metrics\n"), "{text}");
        assert!(!text.contains("/ws/echo"), "{text}");
        config.metrics.enabled = false;
        let text = banner(addr, &config, false);
        assert!(text.contains("  metrics        off"), "{text}");
    }
}
