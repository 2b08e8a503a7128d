//! `warden report`: the reporting queries in `sql/`, run with bound
//! parameters and printed as an aligned table, CSV or JSON.
//!
//! The queries are embedded in the binary, so `warden report` always runs
//! the SQL that shipped with it, and analysts can run the very same files
//! with `psql`. Each file opens with a header comment, which is the one
//! description of the report: `--list` shows its first line, and the tests
//! hold the header's parameters and columns to what the query really takes
//! and returns.
//!
//! Parameters are positional placeholders, the same in every file: `$1`
//! since, `$2` until, `$3` agent (NULL for all), then whatever the report
//! needs from the `[reporting]` settings. Nothing is ever spliced into the
//! SQL text.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::types::{ToSql, Type};

use crate::cli::Failure;
use crate::config::ReportingSettings;
use crate::model::AgentId;

/// One reporting query and how to bind its parameters.
#[derive(Debug)]
pub struct Report {
    pub name: &'static str,
    pub sql: &'static str,
    /// What `$1`, `$2`, ... are, in order.
    pub params: &'static [Param],
}

/// What a positional parameter is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `--since`: start of the range, inclusive.
    Since,
    /// `--until`: end of the range, exclusive.
    Until,
    /// `--agent`, or NULL for every agent.
    Agent,
    /// `reporting.availability_target`, percent.
    TargetPct,
    /// `reporting.downtime_cost_per_minute`.
    CostPerMinute,
    /// `reporting.label_costs`, as `{"label": {"value": cost}}`.
    LabelCosts,
    /// `reporting.trend_bucket`, in seconds.
    BucketSeconds,
    /// `reporting.top_n`.
    Limit,
}

impl Param {
    /// The name the SQL header gives the parameter.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Since => "since",
            Self::Until => "until",
            Self::Agent => "agent",
            Self::TargetPct => "target_pct",
            Self::CostPerMinute => "cost_per_minute",
            Self::LabelCosts => "label_costs",
            Self::BucketSeconds => "bucket_seconds",
            Self::Limit => "limit",
        }
    }

    /// The PostgreSQL type the query casts the placeholder to.
    pub const fn sql_type(self) -> &'static str {
        match self {
            Self::Since | Self::Until => "timestamptz",
            Self::Agent => "text",
            Self::TargetPct | Self::CostPerMinute | Self::BucketSeconds => "float8",
            Self::LabelCosts => "jsonb",
            Self::Limit => "bigint",
        }
    }

    /// The setting the value comes from, for parameters that are not flags.
    pub const fn setting(self) -> Option<&'static str> {
        match self {
            Self::Since | Self::Until | Self::Agent => None,
            Self::TargetPct => Some("reporting.availability_target"),
            Self::CostPerMinute => Some("reporting.downtime_cost_per_minute"),
            Self::LabelCosts => Some("reporting.label_costs"),
            Self::BucketSeconds => Some("reporting.trend_bucket"),
            Self::Limit => Some("reporting.top_n"),
        }
    }

    fn value(self, b: &Bindings) -> &(dyn ToSql + Sync) {
        match self {
            Self::Since => &b.since,
            Self::Until => &b.until,
            Self::Agent => &b.agent,
            Self::TargetPct => &b.target_pct,
            Self::CostPerMinute => &b.cost_per_minute,
            Self::LabelCosts => &b.label_costs,
            Self::BucketSeconds => &b.bucket_seconds,
            Self::Limit => &b.limit,
        }
    }
}

use Param::{Agent, BucketSeconds, CostPerMinute, LabelCosts, Limit, Since, TargetPct, Until};

/// The common three every report takes.
const RANGE: &[Param] = &[Since, Until, Agent];

/// Every report, in the order `--list` shows them.
pub const REPORTS: &[Report] = &[
    Report { name: "fleet_summary", sql: include_str!("../sql/fleet_summary.sql"), params: RANGE },
    Report { name: "agent_availability", sql: include_str!("../sql/agent_availability.sql"), params: RANGE },
    Report {
        name: "slo_breaches",
        sql: include_str!("../sql/slo_breaches.sql"),
        params: &[Since, Until, Agent, TargetPct],
    },
    Report { name: "mttd_mttr", sql: include_str!("../sql/mttd_mttr.sql"), params: RANGE },
    Report { name: "recovery_success", sql: include_str!("../sql/recovery_success.sql"), params: RANGE },
    Report { name: "alert_volume", sql: include_str!("../sql/alert_volume.sql"), params: RANGE },
    Report {
        name: "flapping_agents",
        sql: include_str!("../sql/flapping_agents.sql"),
        params: &[Since, Until, Agent, Limit],
    },
    Report {
        name: "restart_loops",
        sql: include_str!("../sql/restart_loops.sql"),
        params: &[Since, Until, Agent, Limit],
    },
    Report {
        name: "score_trend",
        sql: include_str!("../sql/score_trend.sql"),
        params: &[Since, Until, Agent, BucketSeconds],
    },
    Report {
        name: "score_history",
        sql: include_str!("../sql/score_history.sql"),
        params: &[Since, Until, Agent, BucketSeconds],
    },
    Report {
        name: "heartbeat_volume",
        sql: include_str!("../sql/heartbeat_volume.sql"),
        params: &[Since, Until, Agent, BucketSeconds],
    },
    Report {
        name: "heartbeat_gaps",
        sql: include_str!("../sql/heartbeat_gaps.sql"),
        params: &[Since, Until, Agent, Limit],
    },
    Report {
        name: "executive_summary",
        sql: include_str!("../sql/executive_summary.sql"),
        params: &[Since, Until, Agent, TargetPct, CostPerMinute, LabelCosts],
    },
];

/// The report called `name`.
pub fn find(name: &str) -> Option<&'static Report> {
    REPORTS.iter().find(|r| r.name == name)
}

impl Report {
    /// The one-line description: the header's first line after `name: `.
    pub fn description(&self) -> &'static str {
        let first = self.sql.lines().next().unwrap_or_default();
        let text = first.trim_start_matches('-').trim();
        text.strip_prefix(self.name).and_then(|t| t.strip_prefix(':')).unwrap_or(text).trim()
    }

    /// The header comment, parsed.
    pub fn header(&self) -> Result<Header, String> {
        Header::parse(self.sql)
    }
}

/// What a query's header comment documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub first_line: String,
    /// `(position, name, type)` of each `$n` under `Parameters:`.
    pub params: Vec<(usize, String, String)>,
    /// `(name, type)` of each entry under `Columns:`.
    pub columns: Vec<(String, String)>,
}

impl Header {
    /// Reads the leading `--` comment lines. Sections start with a line
    /// `Parameters:` or `Columns:`; their entries are indented; a line of
    /// its own or an unindented one ends them.
    pub fn parse(sql: &str) -> Result<Self, String> {
        let lines: Vec<&str> = sql.lines().take_while(|l| l.starts_with("--")).map(|l| &l[2..]).collect();
        let first_line = lines.first().map(|l| l.trim().to_string()).ok_or("no header comment")?;
        let mut header = Header { first_line, params: Vec::new(), columns: Vec::new() };
        let mut section = "";
        for line in &lines[1..] {
            let trimmed = line.trim();
            if trimmed == "Parameters:" || trimmed == "Columns:" {
                section = trimmed;
                continue;
            }
            if trimmed.is_empty() || !line.starts_with("   ") {
                section = "";
                continue;
            }
            if section.is_empty() {
                continue;
            }
            let mut words = trimmed.split_whitespace();
            let (Some(first), Some(second)) = (words.next(), words.next()) else {
                return Err(format!("header entry {trimmed:?} needs a name and a type"));
            };
            match section {
                "Parameters:" => {
                    let position = first
                        .strip_prefix('$')
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("parameter entry {trimmed:?} must start with $n"))?;
                    let ty = words.next().ok_or_else(|| format!("parameter entry {trimmed:?} has no type"))?;
                    header.params.push((position, second.to_string(), ty.to_string()));
                }
                _ => header.columns.push((first.to_string(), second.to_string())),
            }
        }
        Ok(header)
    }
}

/// The highest `$n` placeholder in `sql`, comments left out.
pub fn highest_placeholder(sql: &str) -> usize {
    let code: String = sql.lines().map(|l| l.split("--").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let bytes = code.as_bytes();
    let mut highest = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'$' {
            continue;
        }
        let digits: String = code[i + 1..].chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<usize>() {
            highest = highest.max(n);
        }
    }
    highest
}

/// Every report with its description and the settings it reads, aligned.
pub fn list() -> String {
    let mut rows = vec![["report", "description", "settings"].map(String::from)];
    for report in REPORTS {
        let settings: Vec<&str> = report.params.iter().filter_map(|p| p.setting()).collect();
        let settings = if settings.is_empty() { "-".to_string() } else { settings.join(", ") };
        rows.push([report.name.to_string(), report.description().to_string(), settings]);
    }
    crate::text_table::render(&rows)
}

text_enum! {
    /// How `warden report` prints its result.
    pub enum Format {
        Table = "table",
        Csv = "csv",
        Json = "json",
    }
}

/// `warden report NAME [--since 24h] [--until RFC3339|now] [--agent A] [--format table|csv|json]`
/// and `warden report --list`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The report to run (see --list).
    pub name: Option<String>,
    /// List the reports with a line about each, and exit.
    #[arg(long, conflicts_with = "name")]
    pub list: bool,
    /// Start of the range: a duration back from --until (24h, 7d) or an RFC 3339 time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// End of the range (exclusive): an RFC 3339 time or `now`.
    #[arg(long, default_value = "now")]
    pub until: String,
    /// Only this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Output: an aligned table, CSV (RFC 4180) or a JSON array of objects.
    #[arg(long, default_value = "table")]
    pub format: Format,
}

/// The values a report's placeholders are bound to.
#[derive(Debug, Clone)]
pub struct Bindings {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub agent: Option<String>,
    pub target_pct: f64,
    pub cost_per_minute: f64,
    pub label_costs: serde_json::Value,
    pub bucket_seconds: f64,
    pub limit: i64,
}

impl Bindings {
    /// The settings-driven values, over `[since, until)` for every agent.
    pub fn new(settings: &ReportingSettings, since: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        Self {
            since,
            until,
            agent: None,
            target_pct: settings.availability_target,
            cost_per_minute: settings.downtime_cost_per_minute,
            label_costs: serde_json::to_value(&settings.label_costs).unwrap_or_else(|_| serde_json::json!({})),
            bucket_seconds: settings.trend_bucket.get().as_secs_f64(),
            limit: i64::from(settings.top_n),
        }
    }
}

/// A parsed `warden report` command line.
#[derive(Debug)]
pub enum Invocation {
    /// `--list`: needs no database.
    List,
    Run(Job),
}

/// One report to run and print.
#[derive(Debug)]
pub struct Job {
    pub report: &'static Report,
    pub bindings: Bindings,
    pub format: Format,
}

impl Invocation {
    /// Checks the command line before anything connects, so mistakes are
    /// reported at once, with exit status 2.
    pub fn parse(args: ReportArgs, settings: &ReportingSettings, now: DateTime<Utc>) -> Result<Self, Failure> {
        if args.list {
            return Ok(Self::List);
        }
        let Some(name) = args.name else {
            return Err(Failure::usage("name a report to run; `warden report --list` shows them"));
        };
        let report = find(&name).ok_or_else(|| {
            Failure::usage(format!(
                "unknown report {name:?}; `warden report --list` shows the {} reports",
                REPORTS.len()
            ))
        })?;
        let until = parse_until(&args.until, now).map_err(Failure::usage)?;
        let since = parse_since(&args.since, until).map_err(Failure::usage)?;
        if since >= until {
            return Err(Failure::usage(format!(
                "--since ({}) must be before --until ({})",
                rfc3339(since),
                rfc3339(until)
            )));
        }
        let mut bindings = Bindings::new(settings, since, until);
        if let Some(agent) = args.agent {
            let id = AgentId::parse(agent).map_err(|e| Failure::usage(format!("--agent {e}")))?;
            bindings.agent = Some(id.into_string());
        }
        Ok(Self::Run(Job { report, bindings, format: args.format }))
    }
}

/// `now` or an RFC 3339 time.
pub fn parse_until(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if text.trim() == "now" {
        return Ok(now);
    }
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("--until {text:?}: expected an RFC 3339 time like 2025-01-31T00:00:00Z, or now"))
}

/// A duration back from `until` (`24h`, `7d`) or an RFC 3339 time.
pub fn parse_since(text: &str, until: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let problem = || format!("--since {text:?}: expected a duration back from --until (24h, 7d) or an RFC 3339 time");
    if let Ok(t) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let back = crate::config::Duration::parse(text).map_err(|_| problem())?;
    let back = chrono::Duration::from_std(back.get()).map_err(|_| problem())?;
    until.checked_sub_signed(back).ok_or_else(problem)
}

impl Job {
    /// Runs the report and prints it to stdout.
    pub async fn run(self, client: &tokio_postgres::Client) -> Result<(), Failure> {
        let result = execute(client, self.report, &self.bindings).await.map_err(Failure::other)?;
        print!("{}", render(&result, self.format));
        Ok(())
    }
}

/// A report that could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report {report} failed: {message}")]
    Database { report: &'static str, message: String },
    #[error(
        "report {report}: column {column} has type {ty}, which reports do not print; cast it in the query (numeric to float8, intervals to seconds)"
    )]
    UnsupportedColumn { report: &'static str, column: String, ty: String },
    #[error("report {report} takes {takes} parameters but its registry entry binds {binds}")]
    Parameters { report: &'static str, takes: usize, binds: usize },
}

impl ReportError {
    fn database(report: &'static str, e: &tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string().lines().next().unwrap_or_default().to_string(),
        };
        Self::Database { report, message }
    }
}

/// Typed values of a result cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Time(DateTime<Utc>),
    Json(serde_json::Value),
}

/// A report's result: column names and rows of typed values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl ResultSet {
    /// Position of the column called `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// Prepares the report (checking its parameters and column types before it
/// runs), runs it, and decodes every cell. The reports are warden's own
/// SELECTs, never text from a request.
pub async fn execute(
    client: &tokio_postgres::Client,
    report: &'static Report,
    bindings: &Bindings,
) -> Result<ResultSet, ReportError> {
    let statement = client.prepare(report.sql).await.map_err(|e| ReportError::database(report.name, &e))?;
    if statement.params().len() != report.params.len() {
        return Err(ReportError::Parameters {
            report: report.name,
            takes: statement.params().len(),
            binds: report.params.len(),
        });
    }
    for column in statement.columns() {
        if !decodable(column.type_()) {
            return Err(ReportError::UnsupportedColumn {
                report: report.name,
                column: column.name().to_string(),
                ty: column.type_().name().to_string(),
            });
        }
    }
    let params: Vec<&(dyn ToSql + Sync)> = report.params.iter().map(|p| p.value(bindings)).collect();
    let rows = client.query(&statement, &params).await.map_err(|e| ReportError::database(report.name, &e))?;
    let columns = statement.columns().iter().map(|c| c.name().to_string()).collect();
    let mut decoded = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut cells = Vec::with_capacity(row.len());
        for i in 0..row.len() {
            cells.push(decode(row, i).map_err(|e| ReportError::database(report.name, &e))?);
        }
        decoded.push(cells);
    }
    Ok(ResultSet { columns, rows: decoded })
}

fn decodable(ty: &Type) -> bool {
    [
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMP,
        Type::DATE,
        Type::JSON,
        Type::JSONB,
        Type::TEXT_ARRAY,
    ]
    .contains(ty)
}

/// One cell as a typed value; only types [`decodable`] accepts get here.
fn decode(row: &tokio_postgres::Row, i: usize) -> Result<Value, tokio_postgres::Error> {
    fn or_null<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
        v.map(f).unwrap_or(Value::Null)
    }
    let ty = row.columns()[i].type_().clone();
    Ok(match ty {
        Type::BOOL => or_null(row.try_get::<_, Option<bool>>(i)?, Value::Bool),
        Type::INT2 => or_null(row.try_get::<_, Option<i16>>(i)?, |v| Value::Int(v.into())),
        Type::INT4 => or_null(row.try_get::<_, Option<i32>>(i)?, |v| Value::Int(v.into())),
        Type::INT8 => or_null(row.try_get::<_, Option<i64>>(i)?, Value::Int),
        Type::FLOAT4 => or_null(row.try_get::<_, Option<f32>>(i)?, |v| Value::Float(v.into())),
        Type::FLOAT8 => or_null(row.try_get::<_, Option<f64>>(i)?, Value::Float),
        Type::TIMESTAMPTZ => or_null(row.try_get::<_, Option<DateTime<Utc>>>(i)?, Value::Time),
        Type::TIMESTAMP => or_null(row.try_get::<_, Option<chrono::NaiveDateTime>>(i)?, |v| Value::Time(v.and_utc())),
        Type::DATE => or_null(row.try_get::<_, Option<chrono::NaiveDate>>(i)?, |v| Value::Text(v.to_string())),
        Type::JSON | Type::JSONB => or_null(row.try_get::<_, Option<serde_json::Value>>(i)?, Value::Json),
        Type::TEXT_ARRAY => or_null(row.try_get::<_, Option<Vec<Option<String>>>>(i)?, |v| {
            Value::Json(serde_json::Value::from(v.into_iter().map(serde_json::Value::from).collect::<Vec<_>>()))
        }),
        _ => or_null(row.try_get::<_, Option<String>>(i)?, Value::Text),
    })
}

/// Renders a result in `format`.
pub fn render(result: &ResultSet, format: Format) -> String {
    match format {
        Format::Table => render_table(result),
        Format::Csv => render_csv(result),
        Format::Json => render_json(result),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Table cells: short numbers (two decimals at most), whole-second times,
/// `-` for NULL so an empty cell never shifts the eye.
fn table_cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Float(f) if f.is_finite() => {
            let text = format!("{f:.2}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            if text == "-0" { "0".into() } else { text.into() }
        }
        Value::Float(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        Value::Time(t) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
        Value::Json(j) => j.to_string(),
    }
}

fn render_table(result: &ResultSet) -> String {
    let mut rows = Vec::with_capacity(result.rows.len() + 1);
    rows.push(result.columns.clone());
    rows.extend(result.rows.iter().map(|r| r.iter().map(table_cell).collect::<Vec<_>>()));
    crate::text_table::render(&rows)
}

/// CSV cells: full precision, RFC 3339 times, empty for NULL. Text that a
/// spreadsheet would run as a formula (agent names, labels and messages are
/// agent-supplied) starts with a `'`, as OWASP recommends.
fn csv_cell(value: &Value) -> String {
    let text = match value {
        Value::Null => String::new(),
        Value::Float(f) => f.to_string(),
        Value::Time(t) => rfc3339(*t),
        Value::Text(s) if s.starts_with(['=', '+', '-', '@', '\t', '\r']) => format!("'{s}"),
        other => table_cell(other),
    };
    csv_quote(&text)
}

/// RFC 4180: a field holding a comma, a double quote or a line break is
/// enclosed in double quotes, and its double quotes are doubled.
pub fn csv_quote(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// RFC 4180 records end in CRLF, the header record included.
fn render_csv(result: &ResultSet) -> String {
    let mut out = String::new();
    let header: Vec<String> = result.columns.iter().map(|c| csv_quote(c)).collect();
    out.push_str(&header.join(","));
    out.push_str("\r\n");
    for row in &result.rows {
        let cells: Vec<String> = row.iter().map(csv_cell).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

fn json_value(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(n) => (*n).into(),
        // Not-a-number and infinities have no JSON form.
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, serde_json::Value::Number),
        Value::Text(s) => s.clone().into(),
        Value::Time(t) => rfc3339(*t).into(),
        Value::Json(j) => j.clone(),
    }
}

/// An array of objects, one per row, keys in column order (serde_json's
/// map would sort them), one object per line.
fn render_json(result: &ResultSet) -> String {
    if result.rows.is_empty() {
        return "[]\n".into();
    }
    let keys: Vec<String> = result.columns.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
    let mut out = String::from("[\n");
    for (n, row) in result.rows.iter().enumerate() {
        out.push_str("  {");
        for (i, (key, value)) in keys.iter().zip(row).enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{separator}{key}: {}", json_value(value));
        }
        out.push_str(if n + 1 == result.rows.len() { "}\n" } else { "},\n" });
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResultSet {
        ResultSet {
            columns: vec!["agent_id".into(), "pct".into(), "at".into(), "ok".into(), "extra".into()],
            rows: vec![
                vec![
                    Value::Text("a,1".into()),
                    Value::Float(66.666_666_666_666_67),
                    Value::Time("2025-01-31T10:00:00Z".parse().unwrap()),
                    Value::Bool(true),
                    Value::Json(serde_json::json!({"role": "db"})),
                ],
                vec![Value::Text("say \"hi\"".into()), Value::Null, Value::Null, Value::Bool(false), Value::Int(3)],
            ],
        }
    }

    #[test]
    fn every_report_has_a_header_that_matches_its_registry_entry() {
        let mut names = std::collections::HashSet::new();
        for report in REPORTS {
            assert!(names.insert(report.name), "{} listed twice", report.name);
            let header = report.header().unwrap_or_else(|e| panic!("{}: {e}", report.name));
            assert!(header.first_line.starts_with(&format!("{}: ", report.name)), "{}", report.name);
            assert!(!report.description().is_empty());
            assert!(report.sql.contains("\n-- Purpose:"), "{} has no Purpose section", report.name);
            let documented: Vec<(usize, &str, &str)> =
                header.params.iter().map(|(n, name, ty)| (*n, name.as_str(), ty.as_str())).collect();
            let expected: Vec<(usize, &str, &str)> =
                report.params.iter().enumerate().map(|(i, p)| (i + 1, p.name(), p.sql_type())).collect();
            assert_eq!(documented, expected, "{}: header parameters", report.name);
            assert_eq!(highest_placeholder(report.sql), report.params.len(), "{}: placeholders", report.name);
            assert!(!header.columns.is_empty(), "{} documents no columns", report.name);
        }
    }

    #[test]
    fn every_sql_file_is_registered() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sql") {
                let stem = path.file_stem().unwrap().to_string_lossy().to_string();
                assert!(find(&stem).is_some(), "sql/{stem}.sql is not in REPORTS");
            }
        }
    }

    #[test]
    fn placeholders_in_comments_do_not_count() {
        assert_eq!(highest_placeholder("-- $9 is documented\nSELECT $1::int, $2::text -- $7\n"), 2);
        assert_eq!(highest_placeholder("SELECT 1"), 0);
    }

    #[test]
    fn csv_quotes_only_when_needed_and_doubles_quotes() {
        assert_eq!(csv_quote("plain"), "plain");
        assert_eq!(csv_quote("a,b"), "\"a,b\"");
        assert_eq!(csv_quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_quote("two\nlines"), "\"two\nlines\"");
        let csv = render(&sample(), Format::Csv);
        assert_eq!(
            csv,
            "agent_id,pct,at,ok,extra\r\n\"a,1\",66.66666666666667,2025-01-31T10:00:00Z,true,\"{\"\"role\"\":\"\"db\"\"}\"\r\n\"say \"\"hi\"\"\",,,false,3\r\n"
        );
    }

    #[test]
    fn csv_text_that_a_spreadsheet_would_run_is_defused() {
        let row = |cells: Vec<Value>| ResultSet { columns: vec!["x".into(); cells.len()], rows: vec![cells] };
        let text = |s: &str| Value::Text(s.into());
        let csv =
            render(&row(vec![text("=HYPERLINK(\"http://x\")"), text("+1"), text("-2"), text("@SUM(A1)")]), Format::Csv);
        assert_eq!(csv.lines().nth(1).unwrap(), "\"'=HYPERLINK(\"\"http://x\"\")\",'+1,'-2,'@SUM(A1)");
        let csv = render(&row(vec![text("\tx"), text("a=b"), Value::Int(-3), Value::Float(-0.5)]), Format::Csv);
        assert_eq!(csv.lines().nth(1).unwrap(), "'\tx,a=b,-3,-0.5", "numbers keep their sign");
    }

    #[test]
    fn json_is_an_array_of_typed_objects_in_column_order() {
        let text = render(&sample(), Format::Json);
        assert!(text.starts_with("[\n  {\"agent_id\": \"a,1\", \"pct\": 66.66666666666667, \"at\""), "{text}");
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed[0]["ok"], true);
        assert_eq!(parsed[0]["extra"]["role"], "db");
        assert_eq!(parsed[0]["at"], "2025-01-31T10:00:00Z");
        assert!(parsed[1]["pct"].is_null());
        assert_eq!(parsed[1]["extra"], 3);
        assert_eq!(render(&ResultSet::default(), Format::Json), "[]\n");
        let nan = ResultSet { columns: vec!["x".into()], rows: vec![vec![Value::Float(f64::NAN)]] };
        assert_eq!(render(&nan, Format::Json), "[\n  {\"x\": null}\n]\n");
    }

    #[test]
    fn tables_are_aligned_with_short_numbers() {
        let text = render(&sample(), Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "agent_id  pct    at                    ok     extra");
        assert_eq!(lines[2], "a,1       66.67  2025-01-31T10:00:00Z  true   {\"role\":\"db\"}");
        assert_eq!(lines[3], "say \"hi\"  -      -                     false  3");
        assert_eq!(table_cell(&Value::Float(75.0)), "75");
        assert_eq!(table_cell(&Value::Float(0.5)), "0.5");
        assert_eq!(table_cell(&Value::Float(-0.001)), "0");
    }

    #[test]
    fn since_and_until_accept_durations_times_and_now() {
        let now: DateTime<Utc> = "2025-01-31T12:00:00Z".parse().unwrap();
        assert_eq!(parse_until("now", now).unwrap(), now);
        let until = parse_until("2025-01-31T10:00:00+02:00", now).unwrap();
        assert_eq!(until, "2025-01-31T08:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(parse_since("24h", now).unwrap(), "2025-01-30T12:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(parse_since("90m", now).unwrap(), "2025-01-31T10:30:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(
            parse_since("2025-01-01T00:00:00Z", now).unwrap(),
            "2025-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(parse_since("yesterday", now).unwrap_err().contains("--since \"yesterday\""));
        assert!(parse_since("24", now).is_err(), "a bare number is ambiguous");
        assert!(parse_until("tomorrow", now).unwrap_err().contains("RFC 3339"));
    }

    fn args(name: Option<&str>) -> ReportArgs {
        ReportArgs {
            name: name.map(String::from),
            list: false,
            since: "24h".into(),
            until: "now".into(),
            agent: None,
            format: Format::Table,
        }
    }

    fn settings() -> ReportingSettings {
        ReportingSettings {
            availability_target: 99.5,
            downtime_cost_per_minute: 10.0,
            label_costs: [("role".to_string(), [("db".to_string(), 100.0)].into())].into(),
            trend_bucket: crate::config::Duration::from_secs(3600),
            top_n: 20,
        }
    }

    fn usage_message(result: Result<Invocation, Failure>) -> String {
        match result {
            Err(Failure::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_checked_before_anything_connects() {
        let now = Utc::now();
        let s = settings();
        let message = usage_message(Invocation::parse(args(Some("nope")), &s, now));
        assert!(message.contains("unknown report \"nope\"") && !message.contains('\n'), "{message}");
        assert!(usage_message(Invocation::parse(args(None), &s, now)).contains("--list"));
        let mut backwards = args(Some("fleet_summary"));
        backwards.since = "2099-01-01T00:00:00Z".into();
        assert!(usage_message(Invocation::parse(backwards, &s, now)).contains("must be before --until"));
        let mut bad_agent = args(Some("fleet_summary"));
        bad_agent.agent = Some("no spaces".into());
        assert!(usage_message(Invocation::parse(bad_agent, &s, now)).contains("--agent"));

        let Ok(Invocation::Run(job)) = Invocation::parse(args(Some("executive_summary")), &s, now) else {
            panic!("a valid command line")
        };
        assert_eq!(job.bindings.until, now);
        assert_eq!(job.bindings.until - job.bindings.since, chrono::Duration::hours(24));
        assert_eq!(job.bindings.label_costs, serde_json::json!({"role": {"db": 100.0}}));
        assert_eq!(job.bindings.bucket_seconds, 3600.0);
        let mut list = args(None);
        list.list = true;
        assert!(matches!(Invocation::parse(list, &s, now), Ok(Invocation::List)));
    }

    #[test]
    fn the_list_names_every_report_with_its_description() {
        let text = list();
        for report in REPORTS {
            let line = text.lines().find(|l| l.starts_with(&format!("{} ", report.name))).unwrap();
            assert!(line.contains(report.description()), "{line}");
        }
        assert!(text.contains("reporting.availability_target"));
    }
}
