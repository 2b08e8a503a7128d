//! Typed settings, loaded once and validated before anything starts.
//!
//! Three layers, each overriding the one before:
//! 1. `settings.toml` at the repository root, compiled into the binary, so
//!    the defaults a build runs with are exactly the ones documented there;
//! 2. an optional file given by `--config PATH` or `WARDEN_CONFIG`;
//! 3. environment variables `WARDEN__SECTION__KEY` (double underscores
//!    separate levels: `WARDEN__HEALTH__CHECK_INTERVAL=5s`).
//!
//! Any problem stops start-up with one line naming the key, the value and
//! what is allowed ([`SettingsError`]).

mod alerting;
mod console;
mod limits;
mod recovery;
mod retention;
mod sections;
mod types;

use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};

pub use alerting::*;
pub use console::*;
pub use limits::*;
pub use recovery::*;
pub use retention::*;
pub use sections::*;
pub use types::{Duration, Secret};

/// The documented defaults, exactly as shipped in the repository.
pub const DEFAULTS: &str = include_str!("../../settings.toml");

/// The most a settings "file" that is a device is read for.
const MAX_DEVICE_READ: u64 = 1 << 20;

/// Whether `meta` is of a character or block device.
fn is_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_char_device() || meta.file_type().is_block_device()
}

/// Prefix of environment overrides; levels are separated by `__`.
pub const ENV_PREFIX: &str = "WARDEN";

/// A setting that cannot be used, phrased for the operator who set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// Dotted path of the offending key, e.g. `database.pool_size`.
    pub key: Option<String>,
    /// The value as written, when there is one (never for secrets).
    pub value: Option<String>,
    /// Where the value came from: a file path or an environment variable.
    pub origin: Option<String>,
    /// What is allowed instead.
    pub allowed: String,
}

impl SettingsError {
    pub fn new(key: &str, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        let value = if is_secret_key(key) { Secret::REDACTED.to_string() } else { value.to_string() };
        Self { key: Some(key.to_string()), value: Some(value), origin: None, allowed: allowed.into() }
    }

    /// A required setting left empty: shown as `""` (for a secret too;
    /// `[redacted]` would say it was set).
    pub fn unset(key: &str, allowed: impl Into<String>) -> Self {
        Self { key: Some(key.to_string()), value: Some(String::new()), origin: None, allowed: allowed.into() }
    }

    /// A value not repeated in the message, as it may carry a credential
    /// although its key does not say so (a command's argument).
    pub fn unquoted(key: &str, allowed: impl Into<String>) -> Self {
        Self { key: Some(key.to_string()), value: None, origin: None, allowed: allowed.into() }
    }

    fn general(message: impl Into<String>) -> Self {
        Self { key: None, value: None, origin: None, allowed: message.into() }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, &self.value) {
            (Some(key), Some(value)) => write!(f, "invalid setting {key} = {value:?}")?,
            (Some(key), None) => write!(f, "invalid setting {key}")?,
            (None, _) => write!(f, "invalid settings")?,
        }
        if let Some(origin) = &self.origin {
            write!(f, " (from {origin})")?;
        }
        write!(f, ": {}", self.allowed)
    }
}

impl std::error::Error for SettingsError {}

/// Where the optional override file comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH` or `WARDEN_CONFIG`.
    pub file: Option<PathBuf>,
    /// Environment variables to read; `None` reads the process environment.
    /// Tests pass their own map so they never race on the real environment.
    pub env: Option<std::collections::HashMap<String, String>>,
}

impl Sources {
    /// Names where the value behind `e` came from, when the check that
    /// refused it (a cross-key rule, a URL only the driver parses, a secret
    /// variable that is unset) could not tell.
    pub fn locate(&self, mut e: SettingsError) -> SettingsError {
        if let (None, Some(key)) = (&e.origin, &e.key) {
            e.origin = origin_of(key, self);
        }
        e
    }
}

impl Settings {
    /// The built-in defaults alone: no file, no environment.
    pub fn defaults() -> Self {
        Self::load(&Sources { file: None, env: Some(Default::default()) }).expect("the built-in defaults are valid")
    }

    /// Loads the three layers and validates the result.
    pub fn load(sources: &Sources) -> Result<Self, SettingsError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = &sources.file {
            // A regular file, or a device (`--config /dev/null`: the
            // defaults and the environment alone). Not a pipe: opened to be
            // checked, a pipe's one writer would be gone for the read.
            let refused = |allowed: String| SettingsError {
                key: None,
                value: None,
                origin: Some(path.display().to_string()),
                allowed,
            };
            let regular = match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(refused("the settings file does not exist".into()));
                }
                Err(e) => return Err(refused(format!("the settings file cannot be read: {e}"))),
                Ok(meta) if meta.is_dir() => return Err(refused("a directory, not a settings file".into())),
                Ok(meta) if meta.is_file() => true,
                Ok(meta) if is_device(&meta) => false,
                Ok(_) => return Err(refused("not a regular file or a device (a pipe or a socket)".into())),
            };
            // Opened here, so that a file warden may not read (a 0640
            // root-owned file under the unit's own user) is named.
            let cannot_read = |e: std::io::Error| refused(format!("the settings file cannot be read: {e}"));
            let opened = std::fs::File::open(path).map_err(cannot_read)?;
            builder = if regular {
                builder.add_source(File::from(path.as_path()).format(FileFormat::Toml).required(true))
            } else {
                // The config crate reads regular files only. Bounded: a
                // device need not end (`/dev/zero`).
                use std::io::Read;
                let mut text = String::new();
                opened.take(MAX_DEVICE_READ + 1).read_to_string(&mut text).map_err(cannot_read)?;
                if text.len() as u64 > MAX_DEVICE_READ {
                    return Err(refused(format!("a device that gave more than {MAX_DEVICE_READ} bytes")));
                }
                builder.add_source(File::from_str(&text, FileFormat::Toml))
            };
        }
        let names: Vec<String> = match &sources.env {
            Some(map) => map.keys().cloned().collect(),
            None => std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect(),
        };
        if let Some(name) = names.iter().find(|n| misspelt_prefix(n)) {
            return Err(SettingsError {
                key: None,
                value: None,
                origin: Some(format!("environment variable {name}")),
                allowed: format!(
                    "a setting's variable starts with {ENV_PREFIX}__ (two underscores: {ENV_PREFIX}__{}); \
                     as it is, it would be ignored",
                    name.trim_start_matches(ENV_PREFIX).trim_start_matches('_')
                ),
            });
        }
        let mut env = Environment::with_prefix(ENV_PREFIX).prefix_separator("__").separator("__");
        if let Some(map) = &sources.env {
            env = env.source(Some(map.clone().into_iter().collect()));
        }
        let merged = builder.add_source(env).build().map_err(|e| translate(e, None, sources))?;
        let settings: Settings = merged.clone().try_deserialize().map_err(|e| translate(e, Some(&merged), sources))?;
        refuse_rounded_fractions(&merged, &settings, sources)?;
        settings.validate().map_err(|e| sources.locate(as_written(e, &merged)))?;
        Ok(settings)
    }

    /// The effective settings as TOML, every secret-looking field redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("settings always serialize");
        redact(&mut value);
        toml::to_string_pretty(&value).expect("a TOML value always prints")
    }
}

/// A refused value as the operator wrote it (`"120m"`), where the check
/// saw it parsed (`"2h"`). Secrets and values left out stay as they are.
fn as_written(mut e: SettingsError, merged: &Config) -> SettingsError {
    let (Some(key), Some(value)) = (&e.key, &e.value) else { return e };
    if is_secret_key(key) || value.is_empty() || value == Secret::REDACTED {
        return e;
    }
    if let Ok(raw) = merged.get::<config::Value>(key)
        && !matches!(raw.kind, config::ValueKind::Table(_) | config::ValueKind::Array(_) | config::ValueKind::Nil)
    {
        e.value = Some(raw.to_string());
    }
    e
}

/// The config crate rounds a TOML float given for a whole-number setting
/// (`pool_size = 20.5` became 21) where the same text from the environment
/// is refused. A value with a fraction that became a whole number in the
/// settings is refused here, as a mistake rather than a rounding to guess.
fn refuse_rounded_fractions(merged: &Config, settings: &Settings, sources: &Sources) -> Result<(), SettingsError> {
    fn walk(given: &config::Value, read: &toml::Value, path: &str) -> Option<(String, f64)> {
        match (&given.kind, read) {
            (config::ValueKind::Float(f), toml::Value::Integer(_)) if f.fract() != 0.0 => Some((path.to_string(), *f)),
            (config::ValueKind::Table(given), toml::Value::Table(read)) => given.iter().find_map(|(key, value)| {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                walk(value, read.get(key)?, &path)
            }),
            (config::ValueKind::Array(given), toml::Value::Array(read)) => {
                given.iter().zip(read).enumerate().find_map(|(i, (g, r))| walk(g, r, &format!("{path}[{i}]")))
            }
            _ => None,
        }
    }
    let (Ok(given), Ok(read)) = (merged.clone().try_deserialize::<config::Value>(), toml::Value::try_from(settings))
    else {
        return Ok(());
    };
    match walk(&given, &read, "") {
        Some((key, value)) => Err(SettingsError {
            origin: origin_of(&key, sources),
            value: Some(value.to_string()),
            key: Some(key),
            allowed: "expected a whole number".into(),
        }),
        None => Ok(()),
    }
}

/// A variable meant as a setting whose prefix lost an underscore
/// (`WARDEN_DATABASE__URL`): ignored, it would leave the default in place,
/// and for `database.url` that is an embedded cluster. warden's own
/// single-underscore variables (`WARDEN_CONFIG`, `WARDEN_KEY`,
/// `WARDEN_SECRET_*`) have no double underscore after the prefix.
fn misspelt_prefix(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(ENV_PREFIX).and_then(|r| r.strip_prefix('_')) else {
        return false;
    };
    !rest.starts_with('_') && !rest.starts_with("SECRET_") && rest.contains("__")
}

/// Field names that hold secrets by the DESIGN rule: anything whose name
/// contains url, secret, password or token; any HTTP header's value; and
/// the body of an HTTP recovery action (it may carry an API key).
pub fn is_secret_key(key: &str) -> bool {
    if key.contains("headers.") {
        return true;
    }
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    last == "body" || last == "headers" || ["url", "secret", "password", "token"].iter().any(|w| last.contains(w))
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                // HTTP headers carry credentials under any name
                // (Authorization, X-Api-Key): every value goes.
                if let ("headers", toml::Value::Table(headers)) = (key.as_str(), &mut *v) {
                    for (_, h) in headers.iter_mut() {
                        *h = toml::Value::String(Secret::REDACTED.to_string());
                    }
                    continue;
                }
                if key == "body" {
                    *v = toml::Value::String(Secret::REDACTED.to_string());
                    continue;
                }
                if let (true, toml::Value::String(s)) = (is_secret_key(key), &mut *v) {
                    if !s.is_empty() {
                        *s = Secret::REDACTED.to_string();
                    }
                    continue;
                }
                redact(v);
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The environment variable that sets a dotted key.
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_ascii_uppercase())
}

/// Turns the config crate's error into one line naming key, value and origin.
fn translate(err: config::ConfigError, merged: Option<&Config>, sources: &Sources) -> SettingsError {
    use config::ConfigError as E;
    let (key, mut problem) = match &err {
        E::Type { key, unexpected, expected, .. } => (key.clone(), type_problem(unexpected, expected)),
        E::At { key, error, .. } => (key.clone(), error.to_string()),
        E::NotFound(key) => (Some(key.clone()), "this setting is required".to_string()),
        E::FileParse { cause, .. } => {
            return SettingsError {
                key: None,
                value: None,
                origin: sources.file.as_ref().map(|p| p.display().to_string()),
                allowed: format!("not valid TOML: {}", one_line(&cause.to_string())),
            };
        }
        _ => (None, err.to_string()),
    };
    let mut key = key.map(|k| dotted(&k));
    // serde reports an unknown key against its parent table; name the key
    // itself and list its valid siblings instead. Its value is left out:
    // a mistyped key may well hold a secret (`pass`, `webhook`) that the
    // name-based redaction below cannot recognise.
    let unknown = problem.starts_with("unknown field `");
    if let Some(field) = problem.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        let parent = key.take();
        let siblings = problem.split_once("expected ").map(|(_, rest)| rest.replace('`', "")).unwrap_or_default();
        key = Some(match parent {
            Some(parent) => format!("{parent}.{field}"),
            None => field.to_string(),
        });
        problem = if siblings.is_empty() {
            "not a known setting".to_string()
        } else {
            format!("not a known setting; expected {siblings}")
        };
    }
    let Some(mut key) = key else {
        return SettingsError::general(one_line(&problem));
    };
    if let Some(field) = merged.and_then(|m| field_with_bad_value(m, &key, &problem)) {
        key = format!("{key}.{field}");
    }
    // serde quotes the offending value in its message: out with it when it
    // belongs to a secret, or to a field of a table that could not be told
    // (a header given as a string would print the credential).
    let whole_table = merged
        .and_then(|m| m.get::<config::Value>(&key).ok())
        .is_some_and(|v| matches!(v.kind, config::ValueKind::Table(_) | config::ValueKind::Array(_)));
    if (is_secret_key(&key) || whole_table)
        && let Some(span) = quoted_span(&problem).filter(|s| !s.is_empty())
    {
        problem.replace_range(span, Secret::REDACTED);
    }
    // Only a single value is shown: an error reported against a whole table
    // (an HTTP recovery action with a field of the wrong type) would print
    // every field in it, URLs and header values included.
    let value = merged
        .filter(|_| !unknown)
        .and_then(|m| m.get::<config::Value>(&key).ok())
        .filter(|v| !matches!(v.kind, config::ValueKind::Table(_) | config::ValueKind::Array(_)))
        .map(|v| if is_secret_key(&key) { Secret::REDACTED.to_string() } else { v.to_string() });
    SettingsError { origin: origin_of(&key, sources), key: Some(key), value, allowed: one_line(&table_words(&problem)) }
}

/// serde names the Rust type a table becomes ("expected struct
/// ServerSettings", "a map"); the operator wrote TOML.
fn table_words(problem: &str) -> String {
    let mut out = problem.replace("expected a map", "expected a table");
    while let Some(i) = out.find("struct ") {
        let rest = &out[i + 7..];
        let end = rest.find(|c: char| !c.is_alphanumeric() && c != '_').unwrap_or(rest.len());
        out.replace_range(i..i + 7 + end, "a table");
    }
    out
}

/// The config crate speaks of "an unsigned 32 bit integer" and, for a
/// value from the environment, of a string `"-1"`: say what the operator
/// can act on instead.
fn type_problem(unexpected: &impl fmt::Display, expected: &str) -> String {
    let unexpected = unexpected.to_string();
    if !expected.contains("integer") {
        return format!("expected {expected}, found {unexpected}");
    }
    // Shown as 64-bit integer `-1`, or string "-1" from the environment.
    let number = quoted_value(&unexpected).unwrap_or(&unexpected).parse::<i128>().ok();
    match number {
        Some(n) if n < 0 => "expected a whole number, 0 or more".to_string(),
        Some(_) => "a whole number too large for this setting".to_string(),
        None => "expected a whole number".to_string(),
    }
}

/// The value serde quotes in a message: `30` or "two" after the first word
/// or words (`integer `30``, `string "two"`).
fn quoted_value(text: &str) -> Option<&str> {
    quoted_span(text).map(|span| &text[span])
}

fn quoted_span(text: &str) -> Option<std::ops::Range<usize>> {
    let at = text.find(['`', '"'])?;
    let close = if text[at..].starts_with('`') { '`' } else { '"' };
    let len = text[at + 1..].find(close)?;
    Some(at + 1..at + 1 + len)
}

/// A table deserialized through buffered content (a recovery action, whose
/// fields depend on its `kind`) reports a bad field's type against the
/// whole table. serde's message still quotes the value (``invalid type:
/// integer `30`, expected a duration``): the field is the one table entry
/// holding exactly that value, of the kind serde names, when only one does
/// and nothing nested in the table holds it too.
fn field_with_bad_value(merged: &Config, key: &str, problem: &str) -> Option<String> {
    use config::ValueKind as K;
    let rest = problem.strip_prefix("invalid type: ").or_else(|| problem.strip_prefix("invalid value: "))?;
    let (found, _) = rest.split_once(", expected")?;
    let value = quoted_value(found)?;
    let kind = found.split(['`', '"']).next().unwrap_or_default();
    let same = |v: &config::Value| {
        let kind_matches = match &v.kind {
            K::Boolean(_) => kind.contains("boolean"),
            K::I64(_) | K::I128(_) | K::U64(_) | K::U128(_) => kind.contains("integer"),
            K::Float(_) => kind.contains("floating point"),
            K::String(_) => kind.contains("string"),
            _ => false,
        };
        kind_matches && v.to_string() == value
    };
    fn nested(v: &config::Value, same: &dyn Fn(&config::Value) -> bool) -> usize {
        match &v.kind {
            K::Table(t) => t.values().map(|v| nested(v, same)).sum(),
            K::Array(a) => a.iter().map(|v| nested(v, same)).sum(),
            _ => usize::from(same(v)),
        }
    }
    let K::Table(table) = merged.get::<config::Value>(key).ok()?.kind else {
        return None;
    };
    // Counted everywhere in the table, the entry's own value included: one
    // in all, and it sits at the top.
    let anywhere: usize = table.values().map(|v| nested(v, &same)).sum();
    let (field, _) = table.iter().find(|(_, v)| !matches!(v.kind, K::Table(_) | K::Array(_)) && same(v))?;
    (anywhere == 1).then(|| field.clone())
}

/// Which layer set `key`: the environment variable if one is set, else the
/// override file if it mentions the key, else the built-in defaults.
///
/// A key above the variable that set it counts too: `health.weights`
/// (whose sum is off) was set by `WARDEN__HEALTH__WEIGHTS__PERFORMANCE`,
/// and an unknown section `helth` by `WARDEN__HELTH__CHECK_INTERVAL`.
fn origin_of(key: &str, sources: &Sources) -> Option<String> {
    let var = env_var_for(&key.replace('[', ".").replace(']', ""));
    let names: Vec<String> = match &sources.env {
        Some(map) => map.keys().cloned().collect(),
        None => std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect(),
    };
    let below = format!("{var}__");
    let mut setters = names.into_iter().filter(|n| *n == var || n.starts_with(&below)).collect::<Vec<_>>();
    setters.sort();
    if let Some(first) = setters.first() {
        return Some(if setters.len() == 1 { first.clone() } else { format!("{first} and others") });
    }
    let file = sources.file.as_ref()?;
    // `issues[0]` is written `issues = [...]`.
    let last = key.rsplit('.').next().unwrap_or(key).split('[').next().unwrap_or(key);
    // A regular file only: a device was read once already, and may not end.
    if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    text.contains(last).then(|| file.display().to_string())
}

/// The config crate writes the path of a key inside an array of tables
/// without a dot after the index (`recovery.strategies[0]issues[0]`); put
/// it back, so the key reads as written and can be looked up again.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '[' && c != '.' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Resolves the override file from the flag or `WARDEN_CONFIG`.
pub fn override_file(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("WARDEN_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from))
}
