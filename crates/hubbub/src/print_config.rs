//! `--print-config`: the effective configuration as a TOML file that loads
//! back unchanged, every key under a comment saying what it means, and the
//! keys that are not set (the `[tls]` section, `metrics.listen`, `auth.secret`
//! …) commented out with an example value.
//!
//! The meanings come from the key table in `docs/OPERATIONS.md`, which a test
//! keeps complete, so a key added to the configuration is printed (and
//! explained) without anyone editing a list here. The keys themselves come
//! from serializing the configuration.

use anyhow::Context as _;
use hubbub_server::Config;

/// The operations guide, whose key table is the one description of every key.
const GUIDE: &str = include_str!("../../../docs/OPERATIONS.md");

/// The heading of the guide's key table.
const TABLE_HEADING: &str = "## Every configuration key";

/// One row of the guide's key table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    /// The dotted key, e.g. `heartbeat.interval`.
    pub(crate) key: String,
    /// The default as written in the table, when it is a value (not "none").
    pub(crate) default: Option<String>,
    /// What the key does.
    pub(crate) meaning: String,
}

impl Row {
    /// The meaning without its example, which the printout shows as a value.
    pub(crate) fn description(&self) -> &str {
        ["; e.g. `", ", e.g. `"]
            .iter()
            .find_map(|marker| self.meaning.split_once(marker).map(|(before, _)| before))
            .unwrap_or(&self.meaning)
    }

    /// A value to show for the key when it is not set: its default, else the
    /// example the meaning gives as ``e.g. `VALUE` ``.
    pub(crate) fn example(&self) -> Option<String> {
        if let Some(default) = &self.default {
            return Some(default.clone());
        }
        let (_, after) = self.meaning.split_once("e.g. `")?;
        let (example, _) = after.split_once('`')?;
        Some(example.to_owned())
    }
}

/// The rows of the guide's key table, in the guide's order.
pub(crate) fn guide_rows() -> Vec<Row> {
    GUIDE
        .lines()
        .skip_while(|line| !line.starts_with(TABLE_HEADING))
        .skip(1)
        .take_while(|line| !line.starts_with("## "))
        .filter_map(parse_row)
        .collect()
}

/// `` | `key` | `default` | meaning | `` as a [`Row`]; other lines are `None`.
fn parse_row(line: &str) -> Option<Row> {
    let line = line.trim().strip_prefix("| `")?;
    let (key, rest) = line.split_once("` |")?;
    let (default, meaning) = rest.split_once('|')?;
    let default = default.trim();
    let default = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')).map(str::to_owned);
    let meaning = meaning.trim().trim_end_matches('|').trim().to_owned();
    Some(Row { key: key.to_owned(), default, meaning })
}

/// Writes `text` as a TOML value: as it is when it already is one (`1024`,
/// `true`, `[]`, `30.0`), else as a string (`"10s"`, `"0.0.0.0:8080"`).
fn toml_literal(text: &str) -> String {
    if toml::from_str::<toml::Table>(&format!("v = {text}")).is_ok() {
        text.to_owned()
    } else {
        toml::Value::String(text.to_owned()).to_string()
    }
}

/// Every leaf key of a TOML table, dotted, in the table's order.
pub(crate) fn leaf_keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => leaf_keys(&path, inner, out),
            _ => out.push(path),
        }
    }
}

/// The value at a dotted key, if it is set.
fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Every key the configuration has, set or not: the guide's keys in the
/// guide's order, then any set key the guide lacks (a test forbids that, but
/// the printout must stay complete and loadable even so).
pub(crate) fn all_keys(present: &toml::Table, rows: &[Row]) -> Vec<String> {
    let mut keys: Vec<String> = rows.iter().map(|row| row.key.clone()).collect();
    let mut set = Vec::new();
    leaf_keys("", present, &mut set);
    for key in set {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// The text `--print-config` prints for `config`.
pub(crate) fn render(config: &Config) -> anyhow::Result<String> {
    let present = toml::Table::try_from(config).context("printing the configuration")?;
    let rows = guide_rows();

    // Group the keys by section; top-level keys must come before any table.
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for key in all_keys(&present, &rows) {
        let section = key.rsplit_once('.').map_or("", |(section, _)| section).to_owned();
        match sections.iter_mut().find(|(name, _)| *name == section) {
            Some((_, keys)) => keys.push(key),
            None => sections.push((section, vec![key])),
        }
    }
    sections.sort_by_key(|(name, _)| !name.is_empty());

    let mut out = String::from(
        "# Hubbub configuration: every key with its effective value, printed by\n\
         # `hubbub --print-config`; load it with `hubbub --config FILE`.\n\
         # A key written right after `#` (like `#cert = ...`) is not set: remove the\n\
         # `#` to set it. docs/OPERATIONS.md describes every key.\n",
    );
    for (section, keys) in &sections {
        out.push('\n');
        if !section.is_empty() {
            if lookup(&present, section).is_some() {
                out.push_str(&format!("[{section}]\n"));
            } else {
                out.push_str(&format!("#[{section}]\n"));
            }
        }
        for key in keys {
            let leaf = key.rsplit_once('.').map_or(key.as_str(), |(_, leaf)| leaf);
            let row = rows.iter().find(|row| row.key == *key);
            if let Some(row) = row {
                out.push_str(&format!("# {}\n", row.description()));
            }
            match lookup(&present, key) {
                Some(value) => out.push_str(&format!("{leaf} = {value}\n")),
                None => {
                    let example =
                        row.and_then(Row::example).map_or_else(|| "\"\"".to_owned(), |e| toml_literal(&e));
                    out.push_str(&format!("#{leaf} = {example}\n"));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Dotted keys of a JSON value: `(key, is_null)` for every leaf.
    fn json_leaves(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, bool)>) {
        match value.as_object() {
            Some(object) => {
                for (key, value) in object {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    json_leaves(&path, value, out);
                }
            }
            None => out.push((prefix.to_owned(), value.is_null())),
        }
    }

    /// Keys are found from the configuration type itself: a set key is a
    /// leaf of its JSON form, an optional key that is not set is a `null`
    /// there (a whole optional section, like `tls`, is one `null`). So a key
    /// added to the configuration fails this test until the guide has a row
    /// for it, and a row for a key that no longer exists fails it too.
    #[test]
    fn the_guide_describes_every_key_with_its_default_and_no_other() {
        let rows = guide_rows();
        assert!(rows.len() > 40, "the key table was not found: {rows:?}");
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut leaves = Vec::new();
        json_leaves("", &defaults, &mut leaves);
        let covers = |row: &Row, key: &str, is_null: bool| {
            row.key == key || (is_null && row.key.starts_with(&format!("{key}.")))
        };
        let mut problems = Vec::new();
        for (key, is_null) in &leaves {
            let Some(row) = rows.iter().find(|row| covers(row, key, *is_null)) else {
                problems.push(format!("no row for `{key}`"));
                continue;
            };
            // Where the default is a plain value, the row shows it.
            let shown = match key.split('.').fold(&defaults, |v, k| &v[k]) {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Array(a) if a.is_empty() => "[]".to_owned(),
                _ => continue,
            };
            if row.default.as_deref() != Some(shown.as_str()) {
                problems
                    .push(format!("the row for `{key}` shows {:?}, not its default `{shown}`", row.default));
            }
        }
        for row in &rows {
            if !leaves.iter().any(|(key, is_null)| covers(row, key, *is_null)) {
                problems.push(format!("a row for `{}`, which the configuration does not have", row.key));
            }
            let optional = leaves.iter().any(|(key, is_null)| *is_null && covers(row, key, true));
            if optional && row.example().is_none() {
                problems.push(format!(
                    "the row for optional `{}` needs a default or an example (\"e.g. `VALUE`\") for --print-config",
                    row.key
                ));
            }
        }
        assert!(problems.is_empty(), "docs/OPERATIONS.md, table of keys:\n{}", problems.join("\n"));
    }

    #[test]
    fn the_printout_loads_back_to_the_same_configuration() {
        let mut config = Config { listen: "127.0.0.1:7000".parse().unwrap(), ..Config::default() };
        config.heartbeat.interval = Duration::from_millis(1500);
        config.rate_limit.chat_per_sec = 2.5;
        config.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        config.metrics.listen = Some("127.0.0.1:9090".parse().unwrap());
        config.tls = Some(hubbub_server::TlsSettings {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            handshake_timeout: Duration::from_secs(3),
            max_pending_handshakes: 7,
        });
        for config in [Config::default(), config] {
            let text = render(&config).unwrap();
            let back: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, config, "{text}");
        }
    }

    #[test]
    fn unset_keys_are_printed_commented_out_with_their_meaning() {
        let text = render(&Config::default()).unwrap();
        assert!(
            text.contains("\n#[tls]\n# PEM certificate chain; with `tls.key`, serve HTTPS and `wss://`\n"),
            "{text}"
        );
        assert!(text.contains("\n#cert = \"/etc/hubbub/fullchain.pem\"\n"), "{text}");
        assert!(text.contains("\n#handshake_timeout = \"10s\"\n"), "{text}");
        assert!(text.contains("\n[metrics]\n"), "{text}");
        assert!(text.contains("\n#listen = \"127.0.0.1:9090\"\n"), "{text}");
        assert!(
            text.contains("\n# address and port for HTTP and WebSocket\nlisten = \"0.0.0.0:8080\"\n"),
            "{text}"
        );
    }

    /// Removing the `#` before every unset key gives a file that loads and
    /// sets every optional key: the examples have the right types.
    #[test]
    fn uncommenting_every_unset_key_loads() {
        let text = render(&Config::default()).unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
                _ => line,
            })
            .flat_map(|line| [line, "\n"])
            .collect();
        let config: Config = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let mut leaves = Vec::new();
        json_leaves("", &serde_json::to_value(&config).unwrap(), &mut leaves);
        let unset: Vec<_> = leaves.iter().filter(|(_, is_null)| *is_null).collect();
        assert!(unset.is_empty(), "still unset: {unset:?}");
    }

    #[test]
    fn rows_and_literals_parse() {
        let row = parse_row("| `tls.cert` | none | PEM chain, e.g. `/a.pem` |").unwrap();
        assert_eq!(row.default, None);
        assert_eq!(row.example().as_deref(), Some("/a.pem"));
        let row = parse_row("| `x.y` | `10s` | a duration |").unwrap();
        assert_eq!(row.example().as_deref(), Some("10s"));
        assert_eq!(toml_literal("10s"), "\"10s\"");
        assert_eq!(toml_literal("1024"), "1024");
        assert_eq!(toml_literal("[]"), "[]");
        assert_eq!(toml_literal("0.0.0.0:8080"), "\"0.0.0.0:8080\"");
    }
}
