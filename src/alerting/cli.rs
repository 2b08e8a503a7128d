//! `warden alerts list|ack` and `warden silence add|list|remove`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::escalation::AlertState;
use super::silences::{self, NewSilence};
use super::store::{self, AckError, ListFilter};
use crate::cli::Failure;
use crate::db;
use crate::model::Severity;

#[derive(Debug, clap::Subcommand)]
pub enum AlertsCommand {
    /// List alerts, newest first.
    List {
        /// firing, acknowledged or resolved.
        #[arg(long)]
        state: Option<AlertState>,
        /// info, warning, critical or emergency.
        #[arg(long)]
        severity: Option<Severity>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Acknowledge alerts: escalation and repeats stop.
    Ack {
        /// Alert numbers.
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Who acknowledges (default: $USER).
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        comment: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SilenceCommand {
    /// Silence matching alerts for a while (they are still recorded).
    Add {
        /// Agent id to match.
        #[arg(long)]
        agent: Option<String>,
        /// Issue type to match, e.g. agent_unresponsive.
        #[arg(long)]
        issue: Option<String>,
        /// Agent label to match, key=value; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// How long, from now (or --start): 30m, 2h, 1d.
        #[arg(long = "for", value_name = "DURATION", conflicts_with = "until")]
        duration: Option<crate::config::Duration>,
        /// End time, RFC 3339.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Start time, RFC 3339 (default: now).
        #[arg(long)]
        start: Option<DateTime<Utc>>,
        /// Why (required).
        #[arg(long)]
        comment: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// List silences in force or to come (--all: also ended ones).
    List {
        #[arg(long)]
        all: bool,
    },
    /// End a silence now.
    Remove { id: i64 },
}

/// A refused silence in the words of `silence add`'s flags rather than
/// the API's fields.
fn in_flags(e: &silences::Invalid) -> String {
    let flag = match e.field {
        "agent_id" if e.message.contains("matcher") => {
            return "give at least one of --agent, --issue or --label".into();
        }
        "agent_id" => "--agent",
        "issue_type" => "--issue",
        "labels" => "--label",
        "ends_at" => "--for/--until",
        "comment" => "--comment",
        "created_by" => "--by",
        other => other,
    };
    let message = e.message.strip_prefix(e.field).map(str::trim_start).unwrap_or(&e.message);
    format!("{flag}: {message}")
}

pub fn user() -> String {
    std::env::var("USER").ok().filter(|u| !u.trim().is_empty()).unwrap_or_else(|| "cli".into())
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into())
}

fn text(v: &serde_json::Value, key: &str) -> String {
    match &v[key] {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `warden alerts ...`
pub async fn alerts(client: &mut db::Client, command: AlertsCommand) -> Result<(), Failure> {
    match command {
        AlertsCommand::List { state, severity, limit } => {
            if !(1..=1000).contains(&limit) {
                return Err(Failure::usage("--limit must be from 1 to 1000"));
            }
            let filter = ListFilter { state, severity, before: None, limit };
            let rows = store::list(client, &filter).await.map_err(Failure::other)?;
            let mut table = vec![
                ["id", "state", "severity", "subject", "issue", "opened", "level", "suppressed", "acknowledged by"]
                    .map(String::from),
            ];
            for (_, a) in rows {
                let subject = match (&a["agent_id"], &a["channel"]) {
                    (serde_json::Value::String(s), _) => s.clone(),
                    (_, serde_json::Value::String(c)) => format!("channel {c}"),
                    _ => "fleet".into(),
                };
                let opened = a["opened_at"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
                table.push([
                    text(&a, "id"),
                    text(&a, "state"),
                    text(&a, "severity"),
                    subject,
                    text(&a, "issue_type"),
                    when(opened),
                    text(&a, "escalation_level"),
                    text(&a, "suppressed_reason"),
                    text(&a, "acknowledged_by"),
                ]);
            }
            print!("{}", crate::text_table::render(&table));
            Ok(())
        }
        AlertsCommand::Ack { ids, by, comment } => {
            let by = by.unwrap_or_else(user);
            // One alert that cannot be acknowledged (a mistyped id, one
            // resolved meanwhile) does not hold back the others asked for.
            let mut refused = Vec::new();
            for id in ids {
                match store::acknowledge(client, id, by.trim(), comment.as_deref()).await {
                    Ok(a) => {
                        println!("alert {id} acknowledged by {} ({})", text(&a, "acknowledged_by"), text(&a, "state"))
                    }
                    Err(e @ (AckError::NotFound(_) | AckError::Resolved(_))) => refused.push(e.to_string()),
                    Err(AckError::Invalid { field, message }) => {
                        let message = message.strip_prefix(field).map(str::trim_start).unwrap_or(&message);
                        return Err(Failure::usage(format!("--{field}: {message}")));
                    }
                    Err(AckError::Db(e)) => return Err(Failure::other(e)),
                }
            }
            if !refused.is_empty() {
                return Err(Failure::other(refused.join("; ")));
            }
            Ok(())
        }
    }
}

/// `warden silence ...`
pub async fn silence(client: &mut db::Client, command: SilenceCommand) -> Result<(), Failure> {
    match command {
        SilenceCommand::Add { agent, issue, labels, duration, until, start, comment, by } => {
            let mut pairs = BTreeMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    return Err(Failure::usage(format!("--label {l}: expected key=value")));
                };
                pairs.insert(k.trim().to_string(), v.trim().to_string());
            }
            // The database's clock, which the escalator judges silences by.
            let now = silences::now(client).await.map_err(Failure::other)?;
            let ends_at = match (duration, until) {
                (Some(d), _) => Some(start.unwrap_or(now) + d.to_chrono()),
                (None, Some(u)) => Some(u),
                (None, None) => return Err(Failure::usage("give --for DURATION or --until TIME")),
            };
            let s = NewSilence {
                agent_id: agent,
                issue_type: issue,
                labels: pairs,
                // The now the end was counted from, so that `--for 1h`
                // lasts exactly an hour.
                starts_at: Some(start.unwrap_or(now)),
                ends_at,
                comment,
                created_by: by.unwrap_or_else(user),
            };
            s.validate(now).map_err(|e| Failure::usage(in_flags(&e)))?;
            let created = silences::create(client, &s).await.map_err(Failure::other)?;
            // One starting later is not in force yet.
            let from = if created.starts_at > now { "scheduled" } else { "in force" };
            println!(
                "silence {} {from} from {} to {} UTC",
                created.id,
                when(Some(created.starts_at)),
                when(Some(created.ends_at))
            );
            Ok(())
        }
        SilenceCommand::List { all } => {
            let list = silences::list(client, all).await.map_err(Failure::other)?;
            let mut table = vec![
                ["id", "agent", "issue", "labels", "starts", "ends", "by", "comment", "removed"].map(String::from),
            ];
            for s in list {
                let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                table.push([
                    s.id.to_string(),
                    s.agent_id.unwrap_or_else(|| "*".into()),
                    s.issue_type.unwrap_or_else(|| "*".into()),
                    if labels.is_empty() { "*".into() } else { labels.join(",") },
                    when(Some(s.starts_at)),
                    when(Some(s.ends_at)),
                    s.created_by,
                    s.comment,
                    when(s.removed_at),
                ]);
            }
            print!("{}", crate::text_table::render(&table));
            Ok(())
        }
        SilenceCommand::Remove { id } => match silences::remove(client, id).await.map_err(Failure::other)? {
            Some(_) => {
                println!("silence {id} ended");
                Ok(())
            }
            None => Err(Failure::other(format!("no silence {id} in force"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_silence_names_the_flags_of_silence_add() {
        let now = Utc::now();
        let silence = |agent: Option<&str>, issue: Option<&str>, comment: &str| NewSilence {
            agent_id: agent.map(String::from),
            issue_type: issue.map(String::from),
            labels: BTreeMap::new(),
            starts_at: None,
            ends_at: Some(now + chrono::Duration::hours(1)),
            comment: comment.into(),
            created_by: "ops".into(),
        };
        let said = |s: NewSilence| in_flags(&s.validate(now).unwrap_err());
        assert_eq!(said(silence(None, None, "why")), "give at least one of --agent, --issue or --label");
        assert!(
            said(silence(None, Some("nope"), "why")).starts_with("--issue: must be "),
            "{}",
            said(silence(None, Some("nope"), "why"))
        );
        assert!(said(silence(Some("bad id"), None, "why")).starts_with("--agent: "));
        assert_eq!(said(silence(Some("a1"), None, " ")), "--comment: must be 1-1024 characters: say why");
    }
}
