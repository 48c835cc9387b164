//! `hivemind status` and `hivemind top`: the dashboard's summary as text,
//! once or redrawn live.
//!
//! One sample is four API reads (status, roles, nodes, bridges); rates such
//! as calls/s need two samples, so they show only when watching.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::Client;

/// What one look at a host saw.
pub struct Sample {
    pub status: Value,
    pub roles: Value,
    pub nodes: Value,
    pub bridges: Value,
    pub taken: Instant,
}

impl Sample {
    pub fn fetch(api: &Client) -> anyhow::Result<Sample> {
        Ok(Sample {
            status: api.get_json("/v1/status")?,
            roles: api.get_json("/v1/roles")?,
            nodes: api.get_json("/v1/nodes")?["nodes"].take(),
            bridges: api.get_json("/v1/bridges")?,
            taken: Instant::now(),
        })
    }

    fn json(&self) -> Value {
        json!({
            "status": self.status,
            "roles": self.roles,
            "nodes": self.nodes,
            "bridges": self.bridges,
        })
    }

    fn role_calls(&self, name: &str) -> Option<u64> {
        self.roles.as_array()?.iter().find(|role| role["name"] == name)?["stats"]["calls"].as_u64()
    }
}

/// Prints one sample, or with `watch` a new one every `watch` until
/// interrupted; a failed read is shown and retried, so a host restarting
/// or cut off shows as such instead of ending the watch.
pub fn run(api: &Client, json_output: bool, watch: Option<Duration>) -> anyhow::Result<()> {
    let Some(interval) = watch else {
        let sample = Sample::fetch(api)?;
        if json_output {
            println!("{}", serde_json::to_string_pretty(&sample.json())?);
        } else {
            print!("{}", render(&sample, None));
        }
        return Ok(());
    };
    let redraw = std::io::stdout().is_terminal() && !json_output;
    let mut previous: Option<Sample> = None;
    loop {
        let mut stdout = std::io::stdout().lock();
        match Sample::fetch(api) {
            Ok(sample) => {
                if json_output {
                    writeln!(stdout, "{}", sample.json())?;
                } else {
                    let text = render(&sample, previous.as_ref());
                    if redraw {
                        // Home, then clear: the frame replaces the last one.
                        write!(stdout, "\x1b[H\x1b[2J{text}")?;
                    } else {
                        writeln!(stdout, "{text}")?;
                    }
                }
                previous = Some(sample);
            }
            Err(error) if json_output => writeln!(stdout, "{}", json!({ "error": format!("{error:#}") }))?,
            Err(error) => writeln!(stdout, "cannot read the host: {error:#} (retrying every {interval:?})")?,
        }
        stdout.flush()?;
        drop(stdout);
        std::thread::sleep(interval);
    }
}

/// A value as one line of plain text: `-` for null, and control
/// characters (a role's error text may carry terminal escapes) as spaces.
fn text(value: &Value) -> String {
    crate::cli::text(value)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(width.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

/// The summary: node and cluster, nodes, this node's roles, bridges and
/// recent failures. With `previous`, also calls/s and the log's write
/// latency over the interval.
pub fn render(sample: &Sample, previous: Option<&Sample>) -> String {
    let mut out = String::new();
    let status = &sample.status;
    let cluster = &status["cluster"];
    let node = &status["node"];
    let _ = writeln!(
        out,
        "node     {} ({}) at {}, up {:.0} s",
        text(&node["name"]),
        text(&node["id"]),
        text(&node["address"]),
        status["uptime_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    let leader = cluster["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|member| member["leader"] == true);
    let leader_id = leader.map(|member| member["id"].clone()).unwrap_or(Value::Null);
    let leader = leader
        .map(|member| text(&member["name"]))
        .unwrap_or_else(|| "none".into());
    let _ = writeln!(
        out,
        "cluster  {} {}, {}, leader {}, epoch {}, term {}",
        text(&cluster["mode"]),
        text(&cluster["cluster_id"]),
        text(&cluster["health"]).to_uppercase(),
        leader,
        cluster["epoch"],
        cluster["term"]
    );
    if let Some(problem) = cluster["problem"].as_str() {
        let _ = writeln!(out, "         ! {problem}");
    }
    for member in cluster["members"].as_array().into_iter().flatten() {
        if member["self"] != true
            && let Some(stopped) = member["log_stopped"].as_str()
        {
            let _ = writeln!(
                out,
                "         ! member {} says: {}",
                text(&member["name"]),
                clip(stopped, 200)
            );
        }
        if let Some(offset_ms) = member["clock_offset_ms"].as_i64()
            && offset_ms.unsigned_abs() > crate::quorum::CLOCK_WARN_MS
        {
            let _ = writeln!(
                out,
                "         ! member {}'s clock is {:.1} s {} this node's: check time sync (NTP) on both",
                text(&member["name"]),
                offset_ms.unsigned_abs() as f64 / 1000.0,
                if offset_ms > 0 { "ahead of" } else { "behind" }
            );
        }
    }
    let log = &status["log"];
    let mut log_line = format!(
        "log      last seq {}, commit {}, applied {}, {} writes",
        status["last_seq"], log["commit_index"], log["applied_index"], log["writes"]
    );
    if let Some(previous) = previous {
        let writes = log["writes"].as_u64().unwrap_or(0);
        let earlier = previous.status["log"]["writes"].as_u64().unwrap_or(0);
        let seconds = log["write_seconds_sum"].as_f64().unwrap_or(0.0)
            - previous.status["log"]["write_seconds_sum"].as_f64().unwrap_or(0.0);
        if writes > earlier {
            let _ = write!(
                log_line,
                " (avg write {:.1} ms over the last {:.1} s)",
                seconds * 1000.0 / (writes - earlier) as f64,
                sample.taken.duration_since(previous.taken).as_secs_f64()
            );
        }
    }
    let _ = writeln!(out, "{log_line}");

    let _ = writeln!(out, "\nNODES");
    let _ = writeln!(
        out,
        "  {:<18} {:<8} {:<10} {:<7} ROLES",
        "NAME", "VOTE", "HEALTH", "LEADER"
    );
    for node in sample.nodes.as_array().into_iter().flatten() {
        let name = if node["self"] == true {
            format!("{} (this)", text(&node["name"]))
        } else {
            text(&node["name"])
        };
        let health = if node["healthy"] == true {
            "healthy".to_string()
        } else if node["admitted"] == true {
            text(&node["health"])
        } else {
            "joining".to_string()
        };
        let roles: Vec<String> = node["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|role| text(&role["name"]))
            .collect();
        let _ = writeln!(
            out,
            "  {:<18} {:<8} {:<10} {:<7} {}",
            clip(&name, 18),
            if node["voter"] == true { "voter" } else { "learner" },
            health,
            if !leader_id.is_null() && node["id"] == leader_id {
                "yes"
            } else {
                ""
            },
            if roles.is_empty() { "-".into() } else { roles.join(", ") }
        );
    }

    let _ = writeln!(out, "\nROLES (this node)");
    let _ = writeln!(
        out,
        "  {:<16} {:<9} {:<9} {:>9} {:>8} {:>9} {:>6} LAST ERROR",
        "NAME", "STATE", "VERSION", "CALLS", "CALLS/S", "KEPT", "TRAPS"
    );
    let elapsed = previous.map(|previous| sample.taken.duration_since(previous.taken).as_secs_f64());
    for role in sample.roles.as_array().into_iter().flatten() {
        let name = text(&role["name"]);
        let calls = role["stats"]["calls"].as_u64();
        let rate = match (previous.and_then(|previous| previous.role_calls(&name)), calls, elapsed) {
            // A count that went down is a new version's: its rate starts over.
            (Some(before), Some(now), Some(seconds)) if seconds > 0.0 => {
                format!("{:.1}", now.saturating_sub(before) as f64 / seconds)
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:<9} {:>9} {:>8} {:>9} {:>6} {}",
            clip(&name, 16),
            text(&role["state"]),
            clip(&text(&role["version"]), 9),
            calls.map_or("-".into(), |calls| calls.to_string()),
            rate,
            text(&role["stats"]["kept_replies"]),
            text(&role["stats"]["traps"]),
            clip(&text(&role["last_error"]), 60)
        );
    }

    let bridges = sample.bridges.as_array().cloned().unwrap_or_default();
    if !bridges.is_empty() {
        let _ = writeln!(out, "\nBRIDGES");
        let _ = writeln!(
            out,
            "  {:<14} {:<8} {:<14} {:>8} REASON",
            "NAME", "ROUTING", "ACTIVE", "SESSIONS"
        );
        for bridge in &bridges {
            let routing = if bridge["routing"]["enabled"] == true {
                "on"
            } else {
                "off"
            };
            let reason = if bridge["routing"]["enabled"] == true {
                text(&bridge["serving_reason"])
            } else {
                text(&bridge["routing"]["reason"])
            };
            let _ = writeln!(
                out,
                "  {:<14} {:<8} {:<14} {:>8} {}",
                clip(&text(&bridge["name"]), 14),
                routing,
                clip(&text(&bridge["active"]["backend"]), 14),
                text(&bridge["sessions"]["current"]),
                clip(&reason, 60)
            );
        }
    }

    if let Some(failures) = status["recent_failures"].as_array().filter(|list| !list.is_empty()) {
        let _ = writeln!(out, "\nRECENT FAILURES");
        for failure in failures.iter().rev().take(5) {
            let _ = writeln!(
                out,
                "  {}: {}",
                text(&failure["role"]),
                clip(&text(&failure["message"]), 100)
            );
        }
    }
    out
}
