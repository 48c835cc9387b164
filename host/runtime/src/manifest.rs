//! The role manifest, `NAME.toml` beside `NAME.wasm`: limits, grants,
//! host-owned listeners and the role's free-form config.
//!
//! ```toml
//! [limits]
//! memory_mb = 64          # linear memory, MiB (default 64)
//! cpu_ms = 100            # guest time per call, ms (default 100)
//! init_cpu_ms = 5000      # guest time for init, ms (default 5000)
//! workers = 4             # instances at once (default 4, 1-256)
//! queue = 64              # calls waiting for a worker (default 64, at most 10000)
//! max_response_kb = 4096  # largest on-request body, KiB (default 4096)
//!
//! [grants]
//! emit = ["service."]                  # event kind prefixes it may emit (default: none)
//! write_dir = "/etc/nginx/hivemind"    # where write-file may write (default: nowhere)
//! exec = ["nginx -t", "nginx -s reload"]  # command prefixes it may run (default: none)
//! check = ["127.0.0.1"]                  # hosts it may health-check (default: none; "*" for any)
//!
//! [[listeners]]
//! name = "dns"                 # passed to on-packet
//! protocol = "udp"             # "udp" (datagrams) or "tcp" (see below)
//! address = "127.0.0.1:8600"
//!
//! [config]                     # anything; the role reads it as JSON
//! zone = "hive."
//! ```
//!
//! A `tcp` listener carries messages framed as in DNS over TCP (RFC 1035
//! 4.2.2): each is a two-byte big-endian length, then that many bytes. Each
//! message goes to `on-packet` (with the peer as `tcp://IP:PORT`) and the
//! reply, if any, is framed the same way.
//!
//! Unknown keys and wrong types are errors naming the file, line and key, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{HostError, RoleLimits};
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub grants: Grants,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    #[serde(default)]
    pub config: toml::Table,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub memory_mb: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub init_cpu_ms: Option<u64>,
    pub workers: Option<u32>,
    pub queue: Option<u32>,
    pub max_response_kb: Option<u64>,
    pub max_consecutive_traps: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub emit: Vec<String>,
    pub write_dir: Option<PathBuf>,
    #[serde(default)]
    pub exec: Vec<String>,
    /// Hosts the role may health-check (`check`): names or addresses as
    /// written in the check's target, or `*` for any.
    #[serde(default)]
    pub check: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Each datagram is one message.
    #[default]
    Udp,
    /// Length-prefixed messages on TCP connections.
    Tcp,
}

impl ListenerProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Udp => "udp",
            ListenerProtocol::Tcp => "tcp",
        }
    }
}

impl Grants {
    /// Whether `role` may emit events of `kind`; the denial names the fix.
    pub fn allow_emit(&self, role: &str, kind: &str) -> Result<(), HostError> {
        if self.emit.iter().any(|prefix| kind.starts_with(prefix.as_str())) {
            return Ok(());
        }
        Err(HostError::Denied(format!(
            "role `{role}` may not emit `{kind}`; add a prefix of it to grants.emit in {role}.toml"
        )))
    }

    /// The directory `role` may write files in.
    pub fn output_dir(&self, role: &str) -> Result<&Path, HostError> {
        self.write_dir.as_deref().ok_or_else(|| {
            HostError::Denied(format!(
                "role `{role}` has no output directory; set grants.write_dir in {role}.toml"
            ))
        })
    }

    /// Whether `role` may health-check `host` (a name or address).
    pub fn allow_check(&self, role: &str, host: &str) -> Result<(), HostError> {
        if self
            .check
            .iter()
            .any(|grant| grant == "*" || grant.eq_ignore_ascii_case(host))
        {
            return Ok(());
        }
        Err(HostError::Denied(format!(
            "role `{role}` may not check `{host}`; add \"{host}\" (or \"*\") to grants.check in {role}.toml"
        )))
    }

    /// Whether `role` may run `argv` (program, then arguments): a granted
    /// command must be a prefix of it, word by word.
    pub fn allow_exec(&self, role: &str, argv: &[String]) -> Result<(), HostError> {
        let granted = self.exec.iter().any(|grant| {
            let grant: Vec<&str> = grant.split_whitespace().collect();
            grant.len() <= argv.len() && grant.iter().zip(argv).all(|(want, have)| want == have)
        });
        if granted {
            return Ok(());
        }
        Err(HostError::Denied(format!(
            "role `{role}` may not run `{}`; add it (or a prefix of it) to grants.exec in {role}.toml",
            argv.join(" ")
        )))
    }
}

/// Instances of one role at once: each holds its own memory; more than this
/// many is a host's worth of them for one role.
pub const MAX_WORKERS: u32 = 256;
/// Calls waiting for a worker: each holds its request (up to 8 MiB), so an
/// unbounded queue is unbounded memory.
pub const MAX_QUEUE: u32 = 10_000;

impl Manifest {
    /// Parses and checks a manifest; errors name `path`.
    pub fn parse(path: &Path, text: &str, max_memory_bytes: u64) -> Result<Manifest, String> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|error| format!("manifest {}: {error}", path.display()))?;
        manifest
            .check(max_memory_bytes)
            .map_err(|error| format!("manifest {}: {error}", path.display()))?;
        Ok(manifest)
    }

    fn check(&self, max_memory_bytes: u64) -> Result<(), String> {
        let limits = &self.limits;
        if limits
            .memory_mb
            .is_some_and(|mb| mb == 0 || mb << 20 > max_memory_bytes)
        {
            return Err(format!(
                "limits.memory_mb must be between 1 and {} (the host's runtime.max_role_memory_mb)",
                max_memory_bytes >> 20
            ));
        }
        for (key, value) in [("cpu_ms", limits.cpu_ms), ("init_cpu_ms", limits.init_cpu_ms)] {
            if value == Some(0) {
                return Err(format!("limits.{key} must be at least 1"));
            }
        }
        if limits
            .workers
            .is_some_and(|workers| workers == 0 || workers > MAX_WORKERS)
        {
            return Err(format!("limits.workers must be between 1 and {MAX_WORKERS}"));
        }
        if limits.queue.is_some_and(|queue| queue > MAX_QUEUE) {
            return Err(format!(
                "limits.queue must be at most {MAX_QUEUE}: a call waiting longer than that many others is better \
                 refused at once"
            ));
        }
        if let Some(dir) = &self.grants.write_dir
            && !dir.is_absolute()
        {
            return Err(format!("grants.write_dir {} must be an absolute path", dir.display()));
        }
        for command in &self.grants.exec {
            if command.split_whitespace().next().is_none() {
                return Err("grants.exec has an empty command".into());
            }
        }
        let mut names = std::collections::HashSet::new();
        for listener in &self.listeners {
            if !names.insert(listener.name.as_str()) {
                return Err(format!("listener name {:?} is used twice", listener.name));
            }
        }
        Ok(())
    }

    /// The limits with every unset field at its default.
    pub fn role_limits(&self) -> RoleLimits {
        let defaults = RoleLimits::default();
        let limits = &self.limits;
        RoleLimits {
            memory_bytes: limits.memory_mb.map(|mb| mb << 20).unwrap_or(defaults.memory_bytes),
            cpu_per_call: limits
                .cpu_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.cpu_per_call),
            cpu_per_init: limits
                .init_cpu_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.cpu_per_init),
            workers: limits.workers.unwrap_or(defaults.workers),
            queue: limits.queue.unwrap_or(defaults.queue),
            response_bytes: limits
                .max_response_kb
                .map(|kb| kb << 10)
                .unwrap_or(defaults.response_bytes),
            max_consecutive_traps: limits.max_consecutive_traps.unwrap_or(defaults.max_consecutive_traps),
        }
    }

    /// The `[config]` table as JSON, what the role's `config` import returns.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 30;

    /// A misspelt key is rejected with the file, the line and the key named.
    #[test]
    fn misspelt_key_names_file_line_and_key() {
        let error = Manifest::parse(
            Path::new("/roles/dns.toml"),
            "[limits]\nworkers = 2\nmemroy_mb = 3\n",
            MAX,
        )
        .unwrap_err();
        assert!(error.contains("/roles/dns.toml"), "{error}");
        assert!(error.contains("line 3"), "{error}");
        assert!(error.contains("memroy_mb"), "{error}");
    }

    /// A value of the wrong type is rejected with the line and the key.
    #[test]
    fn wrong_type_names_line_and_key() {
        let error = Manifest::parse(Path::new("dns.toml"), "[limits]\nworkers = \"four\"\n", MAX).unwrap_err();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("workers"), "{error}");
    }

    /// Workers and the queue have upper bounds, each named when crossed.
    #[test]
    fn workers_and_queue_are_bounded() {
        for (text, key) in [
            ("[limits]\nqueue = 4000000000\n", "limits.queue"),
            ("[limits]\nworkers = 100000\n", "limits.workers"),
            ("[limits]\nworkers = 0\n", "limits.workers"),
        ] {
            let error = Manifest::parse(Path::new("x.toml"), text, MAX).unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(Manifest::parse(Path::new("x.toml"), "[limits]\nqueue = 10000\nworkers = 256\n", MAX).is_ok());
    }

    /// Unset limits fall back to the runtime's defaults; set ones convert units.
    #[test]
    fn limits_convert_units_and_default() {
        let manifest = Manifest::parse(Path::new("x.toml"), "[limits]\nmemory_mb = 8\ncpu_ms = 20\n", MAX).unwrap();
        let limits = manifest.role_limits();
        assert_eq!(limits.memory_bytes, 8 << 20);
        assert_eq!(limits.cpu_per_call, Duration::from_millis(20));
        assert_eq!(limits.workers, RoleLimits::default().workers);
    }

    /// A listener protocol other than udp or tcp is refused, naming the key.
    #[test]
    fn unknown_listener_protocol_is_refused() {
        let text = "[[listeners]]\nname = \"x\"\nprotocol = \"sctp\"\naddress = \"127.0.0.1:1\"\n";
        let error = Manifest::parse(Path::new("x.toml"), text, MAX).unwrap_err();
        assert!(error.contains("sctp") && error.contains("protocol"), "{error}");
        let tcp = "[[listeners]]\nname = \"x\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:1\"\n";
        let manifest = Manifest::parse(Path::new("x.toml"), tcp, MAX).unwrap();
        assert_eq!(manifest.listeners[0].protocol, ListenerProtocol::Tcp);
    }
}
