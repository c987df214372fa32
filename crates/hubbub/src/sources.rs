//! Where each configuration value came from, and configuration errors told
//! in those terms: the key as the user wrote it (`heartbeat.intervall` in a
//! file, `HUBBUB_WEBSOCKET_OUTBOUND_QUEUE`, `--heartbeat-interval`), the
//! value, and what is allowed, in one line.
//!
//! figment's own messages speak of `"default.heartbeat.intervall"` (its
//! profile name) and of serde types (`expected usize`), and leave the value
//! out; this module keeps the figment so that it can say instead which
//! layer a value came from.

use std::path::PathBuf;

use figment::Figment;
use figment::error::{Actual, Kind};
use hubbub_server::{Config, ConfigError};

/// The command-line flags that set configuration keys, and whether each
/// takes a value (`--listen ADDR`) or is a switch (`--no-echo`). A test
/// checks this against every key the flags can set.
pub(crate) const FLAGS: &[(&str, &str, bool)] = &[
    ("listen", "--listen", true),
    ("echo_enabled", "--no-echo", false),
    ("heartbeat.interval", "--heartbeat-interval", true),
    ("heartbeat.timeout", "--heartbeat-timeout", true),
    ("uploads.dir", "--upload-dir", true),
    ("rate_limit.enabled", "--no-rate-limit", false),
    ("tls.cert", "--tls-cert", true),
    ("tls.key", "--tls-key", true),
];

/// Which layer set a value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The built-in default.
    Default,
    /// The TOML file at this path.
    File(PathBuf),
    /// A `HUBBUB_*` environment variable.
    Environment,
    /// A command-line flag.
    Flag,
}

/// The layers a configuration was read from.
pub(crate) struct Sources {
    /// The merged layers; each value remembers its provider.
    figment: Figment,
    /// The type name figment gives the flags' provider.
    flags_provider: &'static str,
}

impl Sources {
    /// Wraps the figment the configuration was extracted from;
    /// `flags_provider` is `std::any::type_name` of the type the flags were
    /// serialized from.
    pub(crate) fn new(figment: Figment, flags_provider: &'static str) -> Self {
        Self { figment, flags_provider }
    }

    /// The configuration the layers make, or an error in the user's terms.
    pub(crate) fn extract(&self) -> anyhow::Result<Config> {
        self.figment.extract().map_err(|err| self.read_error(&err))
    }

    fn origin_of(&self, metadata: Option<&figment::Metadata>) -> Origin {
        let Some(metadata) = metadata else { return Origin::Default };
        if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
            Origin::File(path.to_owned())
        } else if metadata.name == self.flags_provider {
            Origin::Flag
        } else if metadata.name.contains("environment") {
            Origin::Environment
        } else {
            Origin::Default
        }
    }

    /// The value at a dotted key as TOML (`"10s"`, `5`, `[]`), if any.
    fn toml_value(&self, key: &str) -> Option<String> {
        let value = self.figment.find_value(key).ok()?;
        toml::Value::try_from(&value).ok().map(|v| v.to_string())
    }

    /// The value at a dotted key as a person typed it on a command line:
    /// strings without quotes.
    fn raw_value(&self, key: &str) -> Option<String> {
        let value = self.figment.find_value(key).ok()?;
        match toml::Value::try_from(&value).ok()? {
            toml::Value::String(text) => Some(text),
            other => Some(other.to_string()),
        }
    }

    /// How the key at `path` was written in a layer, with its value:
    /// `listen = "x" in hubbub.toml`, `HUBBUB_LISTEN=x`, `--listen x`, or
    /// `listen = "x" (the default)`.
    fn written(&self, origin: &Origin, path: &[String]) -> String {
        let key = path.join(".");
        match origin {
            Origin::File(file) => match self.toml_value(&key) {
                Some(value) => format!("{key} = {value} in {}", file.display()),
                None => format!("{key} in {}", file.display()),
            },
            Origin::Environment => {
                let name = env_name(path);
                let value = std::env::var(&name).ok().or_else(|| self.raw_value(&key)).unwrap_or_default();
                format!("{name}={value}")
            }
            Origin::Flag => match FLAGS.iter().find(|(k, _, _)| *k == key) {
                Some((_, flag, true)) => format!("{flag} {}", self.raw_value(&key).unwrap_or_default()),
                Some((_, flag, false)) => (*flag).to_owned(),
                None => format!("{key} (from the command line)"),
            },
            Origin::Default => match self.toml_value(&key) {
                Some(value) => format!("{key} = {value} (the default)"),
                None => key,
            },
        }
    }

    /// How the user set `key` (`HUBBUB_LISTEN=x`, `--listen x`, `listen =
    /// "x" in FILE`), or `None` when it has its default.
    pub(crate) fn setting(&self, key: &str) -> Option<String> {
        let origin = self.origin_of(self.figment.find_metadata(key));
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        (origin != Origin::Default).then(|| self.written(&origin, &path))
    }

    /// Like [`Sources::setting`], but names the default too.
    pub(crate) fn describe(&self, key: &str) -> String {
        self.setting(key).unwrap_or_else(|| {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            self.written(&Origin::Default, &path)
        })
    }

    /// One line for an error figment found while reading the layers.
    fn read_error(&self, err: &figment::Error) -> anyhow::Error {
        let origin = self.origin_of(err.metadata.as_ref());
        let mut path = err.path.clone();
        // An item of a list is named by the list's key and the item's place.
        let mut item = None;
        if let Some(index) = path.iter().position(|part| part.parse::<usize>().is_ok()) {
            item = path[index].parse::<usize>().ok().map(|i| i + 1);
            path.truncate(index);
        }
        if let Kind::MissingField(field) = &err.kind {
            let mut missing = path.clone();
            missing.push(field.to_string());
            let (spelled, place) = match &origin {
                Origin::Environment => {
                    (env_name(&missing), "with the other variables of its section".to_owned())
                }
                Origin::File(file) => (missing.join("."), format!("in {}", file.display())),
                _ => (missing.join("."), "with the other keys of its section".to_owned()),
            };
            return anyhow::anyhow!("invalid configuration: {spelled} is missing; it is required {place}");
        }
        let problem = match &err.kind {
            Kind::UnknownField(found, expected) => {
                let mut text =
                    format!("unknown key; {}", allowed_keys(&path[..path.len().saturating_sub(1)], expected));
                if let Some(close) = closest(found, expected) {
                    let mut fixed = path.clone();
                    if let Some(last) = fixed.last_mut() {
                        close.clone_into(last);
                    }
                    let spelled = match origin {
                        Origin::Environment => env_name(&fixed),
                        _ => fixed.join("."),
                    };
                    text = format!(
                        "unknown key (did you mean {spelled}?); {}",
                        allowed_keys(&path[..path.len().saturating_sub(1)], expected)
                    );
                }
                text
            }
            Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
                let mut text = format!("expected {}", plain_expected(expected));
                // humantime knows why a duration did not parse.
                if let (Actual::Str(value), "a duration") = (actual, expected.as_str())
                    && let Err(why) = humantime::parse_duration(value)
                {
                    text = format!("{why}; {text}");
                }
                text
            }
            Kind::MissingField(field) => format!("`{field}` is required here"),
            Kind::Message(message) => plain_message(message),
            other => other.to_string(),
        };
        if path.is_empty() {
            let place = match &origin {
                Origin::File(file) => file.display().to_string(),
                Origin::Environment => "HUBBUB_* environment variables".to_owned(),
                Origin::Flag => "command line".to_owned(),
                Origin::Default => "defaults".to_owned(),
            };
            return anyhow::anyhow!("invalid configuration in {place}: {problem}");
        }
        let item = item.map(|n| format!(" (item {n})")).unwrap_or_default();
        anyhow::anyhow!("invalid configuration: {}{item}: {problem}", self.written(&origin, &path))
    }

    /// One line for a configuration the server refused: the message, after
    /// how the user set each key it concerns ([`ConfigError::keys`]).
    pub(crate) fn refused(&self, err: &ConfigError) -> anyhow::Error {
        let mut message = err.to_string();
        // The causes, each once: some messages already include their cause.
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = cause.source();
        }
        // A history file that cannot be opened, or a cluster's Redis that
        // cannot be reached, is not a mistake in the configuration: the
        // message says which and why.
        if matches!(err, ConfigError::History(_) | ConfigError::Cluster(_)) {
            return anyhow::anyhow!("{message}");
        }
        let settings: Vec<String> = err.keys().iter().filter_map(|key| self.setting(key)).collect();
        if settings.is_empty() {
            anyhow::anyhow!("invalid configuration: {message}")
        } else {
            anyhow::anyhow!("invalid configuration: {}: {message}", settings.join(", "))
        }
    }
}

/// The environment variable for a key path: `HUBBUB_HEARTBEAT_INTERVAL`.
fn env_name(path: &[String]) -> String {
    format!("HUBBUB_{}", path.join("_").to_ascii_uppercase())
}

/// `"[heartbeat] has: interval, timeout"`.
fn allowed_keys(section: &[String], expected: &[&str]) -> String {
    let place =
        if section.is_empty() { "the top level".to_owned() } else { format!("[{}]", section.join(".")) };
    format!("{place} has: {}", expected.join(", "))
}

/// The expected key nearest to a misspelt one, if it is near enough to be
/// what was meant.
fn closest<'a>(found: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|candidate| (edit_distance(found, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, for suggesting a key.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// serde's name for what it wanted, in words.
fn plain_expected(expected: &str) -> String {
    match expected {
        "u8" => format!("a whole number from 0 to {}", u8::MAX),
        "u16" => format!("a whole number from 0 to {}", u16::MAX),
        "u32" => format!("a whole number from 0 to {}", u32::MAX),
        "u64" | "usize" | "u128" => "a whole number, 0 or more".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" | "i128" => "a whole number".to_owned(),
        "f32" | "f64" => "a number, such as 2.5".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a duration" => "a duration such as 30s, 500ms or 10m".to_owned(),
        "a sequence" => "a list, such as [\"a\", \"b\"] (in a variable: [a, b])".to_owned(),
        "socket address" => "an address and port, such as 0.0.0.0:8080 or [::1]:8080".to_owned(),
        "path string" => "a file or directory path".to_owned(),
        other if other.starts_with("struct ") || other == "a map" || other == "map" => {
            "a table of keys (a [section])".to_owned()
        }
        other => other.replace('`', ""),
    }
}

/// A free-form message from a parser, made one line and told what is
/// allowed where the parser does not say.
fn plain_message(message: &str) -> String {
    // TOML syntax errors come as a multi-line snippet: keep the position
    // and the reason.
    if message.starts_with("TOML parse error") {
        let snippet =
            |line: &&str| line.is_empty() || line.contains('|') || line.chars().all(|c| c == '^' || c == ' ');
        let mut lines = message.lines().map(str::trim).filter(|line| !snippet(line));
        let position = lines.next().unwrap_or(message);
        let reason: Vec<&str> = lines.collect();
        return format!("{position}: {}", reason.join("; ")).trim_end_matches(": ").to_owned();
    }
    let hint = if message.contains("socket address") {
        "; expected an address and port, such as 0.0.0.0:8080 or [::1]:8080"
    } else if message.contains("IP address") || message.contains("prefix length") {
        "; expected an address or CIDR block, such as 10.0.0.0/8 or 192.168.1.7"
    } else {
        ""
    };
    format!("{}{hint}", message.lines().collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_are_suggested() {
        assert_eq!(closest("intervall", &["interval", "timeout"]), Some("interval"));
        assert_eq!(closest("max_txt_chars", &["max_text_chars", "max_room_chars"]), Some("max_text_chars"));
        assert_eq!(closest("colour", &["interval", "timeout"]), None);
    }

    #[test]
    fn toml_syntax_errors_become_one_line() {
        let message = "TOML parse error at line 2, column 9\n  |\n2 | listen = \n  |         ^\nstring values must be quoted, expected literal string\n";
        assert_eq!(
            plain_message(message),
            "TOML parse error at line 2, column 9: string values must be quoted, expected literal string"
        );
    }
}
