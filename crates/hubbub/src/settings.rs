//! Turns the command line, the config file and `HUBBUB_*` environment
//! variables into one validated [`Config`].
//!
//! Precedence, lowest first: built-in defaults, the TOML file, environment
//! variables, command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use hubbub_server::Config;
use serde::Serialize;

use crate::sources::Sources;

/// Help text listing how environment variables map onto config keys.
const ENV_HELP: &str = "\
CONFIGURATION:
  Every key of the TOML config file can also be set in the environment as
  HUBBUB_<KEY>, with a section's name joined to its key by '_':

    listen = \"127.0.0.1:9000\"          HUBBUB_LISTEN=127.0.0.1:9000
    trusted_proxies = [\"10.0.0.0/8\"]   HUBBUB_TRUSTED_PROXIES='[10.0.0.0/8]'
    echo_enabled = false               HUBBUB_ECHO_ENABLED=false
    shutdown_drain = \"10s\"             HUBBUB_SHUTDOWN_DRAIN=10s
    [protocol] max_text_chars = 8192   HUBBUB_PROTOCOL_MAX_TEXT_CHARS=8192
    [websocket] outbound_queue = 1024  HUBBUB_WEBSOCKET_OUTBOUND_QUEUE=1024
    [heartbeat] interval = \"10s\"       HUBBUB_HEARTBEAT_INTERVAL=10s
    [uploads] quota_bytes = 1000000    HUBBUB_UPLOADS_QUOTA_BYTES=1000000

  Precedence, lowest first: defaults, --config file, environment, flags.
  `hubbub --print-config` prints every key with its effective value;
  docs/OPERATIONS.md documents every key.";

/// Hubbub: a real-time chat server over WebSocket.
///
/// Serves the chat protocol on /ws/chat (and /), server events on
/// /ws/notifications, an echo endpoint on /ws/echo, GET /health,
/// GET /api/status and a chat page on GET /, all on one port.
#[derive(Debug, Parser)]
#[command(name = "hubbub", version, after_long_help = ENV_HELP)]
pub(crate) struct Cli {
    /// Address to listen on [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// TOML config file with any of the keys --print-config shows
    #[arg(long, short = 'c', value_name = "FILE", env = "HUBBUB_CONFIG")]
    config: Option<PathBuf>,

    /// PEM certificate chain: serve HTTPS and wss:// (needs --tls-key); reloaded on SIGHUP
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Do not serve /ws/echo
    #[arg(long)]
    no_echo: bool,

    /// Turn off per-connection message rate limits (for load benchmarks)
    #[arg(long)]
    no_rate_limit: bool,

    /// Directory for uploaded files [default: ./data/uploads]
    #[arg(long, value_name = "DIR")]
    upload_dir: Option<PathBuf>,

    /// Run as one node of a cluster sharing rooms, history and presence
    /// through this Redis (`redis://HOST:PORT`, `rediss://` for TLS); also
    /// `[cluster] redis_url`, HUBBUB_CLUSTER_REDIS_URL
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,

    /// Time between heartbeat pings to each connection, e.g. `30s`, `500ms` [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,

    /// How long a ping may go unanswered before the connection is dropped [default: 35s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Option<Duration>,

    /// Print the effective configuration as a commented TOML file and exit:
    /// every key with its value and meaning, unset keys commented out
    #[arg(long)]
    print_config: bool,

    /// Log format: `text` for people, `json` (one object per line) for log shippers
    #[arg(long, value_name = "FORMAT", env = "HUBBUB_LOG_FORMAT", default_value = "text")]
    pub(crate) log_format: LogFormat,

    /// Log filter, e.g. `info` or `hubbub_server=debug`
    #[arg(long, value_name = "FILTER", env = "HUBBUB_LOG", default_value = "info")]
    pub(crate) log: String,

    /// Whether `log` came from `HUBBUB_LOG` rather than `--log`, so an error
    /// names what the user wrote.
    #[arg(skip)]
    log_from_env: bool,

    /// Whether `config` came from `HUBBUB_CONFIG` rather than `--config`.
    #[arg(skip)]
    config_from_env: bool,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the connection's span fields.
    Json,
}

/// What the command line asks for, once read.
pub(crate) enum Action {
    /// Run the server.
    Serve {
        /// The validated configuration.
        config: Box<Config>,
        /// Where its values came from, to name them in later errors.
        sources: Box<Sources>,
    },
    /// Print this TOML and exit.
    PrintConfig(String),
}

/// The flags that override config keys, serialized over the other layers.
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    echo_enabled: Option<bool>,
    heartbeat: HeartbeatOverrides,
    uploads: UploadOverrides,
    cluster: ClusterOverrides,
    rate_limit: RateLimitOverrides,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsOverrides>,
}

/// The `[tls]` keys the command line can set.
#[derive(Serialize)]
struct TlsOverrides {
    cert: PathBuf,
    key: PathBuf,
}

/// The `[rate_limit]` keys the command line can set.
#[derive(Serialize)]
struct RateLimitOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
}

/// The `[cluster]` keys the command line can set.
#[derive(Serialize)]
struct ClusterOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
}

/// The `[uploads]` keys the command line can set.
#[derive(Serialize)]
struct UploadOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<PathBuf>,
}

/// The `[heartbeat]` keys the command line can set, as humantime text.
#[derive(Serialize)]
struct HeartbeatOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
}

impl Cli {
    /// Reads the command line (and the variables that stand for flags);
    /// exits with clap's message on a usage error.
    pub(crate) fn from_env_and_args() -> Self {
        let matches = Self::command().get_matches();
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        cli.log_from_env = matches.value_source("log") == Some(ValueSource::EnvVariable);
        cli.config_from_env = matches.value_source("config") == Some(ValueSource::EnvVariable);
        cli
    }

    /// The log filter, or an error naming `--log` or `HUBBUB_LOG` as the
    /// user wrote it.
    pub(crate) fn log_filter(&self) -> anyhow::Result<tracing_subscriber::EnvFilter> {
        tracing_subscriber::EnvFilter::try_new(&self.log).map_err(|err| {
            // The error's source repeats its message: print it once.
            let written = if self.log_from_env {
                format!("HUBBUB_LOG={}", self.log)
            } else {
                format!("--log {}", self.log)
            };
            anyhow::anyhow!(
                "invalid log filter: {written}: {err}; a filter is a level or TARGET=LEVEL, comma-separated, \
                 such as info,hubbub_server=debug"
            )
        })
    }

    /// Layers defaults, file, environment and flags into a validated config.
    pub(crate) fn resolve(&self) -> anyhow::Result<Action> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &self.config {
            if !path.is_file() {
                let written = if self.config_from_env { "HUBBUB_CONFIG=" } else { "--config " };
                anyhow::bail!("{written}{}: no such file", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(environment()).merge(Serialized::defaults(Overrides {
            listen: self.listen,
            echo_enabled: self.no_echo.then_some(false),
            heartbeat: HeartbeatOverrides {
                interval: self.heartbeat_interval.map(|d| humantime::format_duration(d).to_string()),
                timeout: self.heartbeat_timeout.map(|d| humantime::format_duration(d).to_string()),
            },
            uploads: UploadOverrides { dir: self.upload_dir.clone() },
            cluster: ClusterOverrides { redis_url: self.redis_url.clone() },
            rate_limit: RateLimitOverrides { enabled: self.no_rate_limit.then_some(false) },
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsOverrides { cert: cert.clone(), key: key.clone() }),
                _ => None,
            },
        }));
        let sources = Sources::new(figment, std::any::type_name::<Overrides>());
        let config = sources.extract()?;
        config.validate().map_err(|err| sources.refused(&err))?;
        if self.print_config {
            return Ok(Action::PrintConfig(crate::print_config::render(&config)?));
        }
        Ok(Action::Serve { config: Box::new(config), sources: Box::new(sources) })
    }
}

/// `HUBBUB_*` variables as config keys: `HUBBUB_PROTOCOL_MAX_TEXT_CHARS`
/// becomes `protocol.max_text_chars`. The variables that only the command
/// line reads are left out.
fn environment() -> Env {
    Env::prefixed("HUBBUB_").ignore(&["config", "log", "log_format"]).map(|key| {
        let key = key.as_str().to_ascii_lowercase();
        for section in Config::SECTIONS {
            if let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('_')) {
                return format!("{section}.{rest}").into();
            }
        }
        key.into()
    })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("hubbub").chain(args.iter().copied()))?;
        match cli.resolve()? {
            Action::Serve { config, .. } => Ok(*config),
            Action::PrintConfig(_) => anyhow::bail!("unexpected print"),
        }
    }

    #[test]
    fn layers_file_environment_and_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "hubbub.toml",
                "listen = \"127.0.0.1:7000\"\nshutdown_drain = \"250ms\"\n[protocol]\nmax_text_chars = 100\n",
            )?;
            jail.set_env("HUBBUB_PROTOCOL_MAX_TEXT_CHARS", "200");
            jail.set_env("HUBBUB_WEBSOCKET_OUTBOUND_QUEUE", "64");
            jail.set_env("HUBBUB_TRUSTED_PROXIES", "[10.0.0.0/8, 127.0.0.1/32]");
            jail.set_env("HUBBUB_HEARTBEAT_TIMEOUT", "2s");
            let config = resolve(&[
                "--config",
                "hubbub.toml",
                "--listen",
                "127.0.0.1:7001",
                "--heartbeat-interval",
                "500ms",
                "--no-rate-limit",
            ])
            .map_err(|e| e.to_string())?;
            assert_eq!(config.listen, "127.0.0.1:7001".parse().unwrap());
            assert_eq!(config.shutdown_drain, std::time::Duration::from_millis(250));
            assert_eq!(config.protocol.max_text_chars, 200);
            assert_eq!(config.websocket.outbound_queue, 64);
            assert_eq!(config.trusted_proxies.len(), 2);
            assert_eq!(config.heartbeat.interval, Duration::from_millis(500));
            assert_eq!(config.heartbeat.timeout, Duration::from_secs(2));
            assert!(!config.rate_limit.enabled);
            Ok(())
        });
    }

    #[test]
    fn bad_configuration_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "[protocol]\nmax_txt_chars = 5\n")?;
            let err = format!("{:#}", resolve(&["--config", "typo.toml"]).unwrap_err());
            assert!(err.contains("max_txt_chars"), "{err}");
            jail.set_env("HUBBUB_WEBSOCKET_OUTBOUND_QUEUE", "0");
            let err = format!("{:#}", resolve(&[]).unwrap_err());
            assert!(err.contains("websocket.outbound_queue must be greater than zero"), "{err}");
            Ok(())
        });
        let err = format!("{:#}", resolve(&["--config", "/nonexistent/hubbub.toml"]).unwrap_err());
        assert!(err.contains("--config /nonexistent/hubbub.toml: no such file"), "{err}");
    }
}
