//! The `hubbub` binary: read the configuration, set up logging, bind, serve
//! until SIGINT or SIGTERM, exit.

mod settings;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use hubbub_server::Server;
use settings::{Action, Cli, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let config = match cli.resolve()? {
        Action::Serve(config) => *config,
        Action::PrintConfig(text) => {
            #[allow(clippy::print_stdout)] // asked for on the command line
            {
                print!("{text}");
            }
            return Ok(());
        }
    };
    let filter = EnvFilter::try_new(&cli.log).context("invalid --log filter")?;
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => {
            tracing_subscriber::fmt().json().with_current_span(true).with_env_filter(filter).init()
        }
    }

    let server = Server::new(config)?;
    let listen = server.config().listen;
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let host =
        if addr.ip().is_unspecified() { format!("localhost:{}", addr.port()) } else { addr.to_string() };
    let (http, ws) = if server.tls().is_some() { ("https", "wss") } else { ("http", "ws") };
    #[allow(clippy::print_stdout)] // the URLs are for the operator, not the log
    {
        println!("Hubbub {} listening on {addr}", env!("CARGO_PKG_VERSION"));
        println!("  chat page      {http}://{host}/");
        println!("  chat socket    {ws}://{host}/ws/chat  (and {ws}://{host}/)");
        println!("  notifications  {ws}://{host}/ws/notifications");
        if server.config().echo_enabled {
            println!("  echo           {ws}://{host}/ws/echo");
        }
        println!("  health         {http}://{host}/health   status {http}://{host}/api/status");
    }
    if let Some(tls) = server.tls().cloned() {
        tokio::spawn(reload_on_sighup(tls));
    }
    server.run(listener, shutdown_signal()).await.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
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

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
