//! `[[bridge]]` sections of the host config: what each bridge listens on,
//! its backends in priority order, and how they are checked.
//!
//! Every key, with its default, is in `host/hivemind/src/config-example.toml`
//! (printed by `hivemind up --help`).
//!
//! Every node of a cluster is expected to carry the same `[[bridge]]`
//! sections: the leader decides from its own copy.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    pub name: String,
    pub listen: String,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub failback: Option<bool>,
    pub when_isolated: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub splice: Option<bool>,
    pub max_sessions: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub name: String,
    pub address: String,
    pub check: Option<String>,
    pub check_address: Option<String>,
    pub path: Option<String>,
    pub json_field: Option<String>,
    pub json_value: Option<toml::Value>,
}

/// A bridge as the host runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    pub name: String,
    pub listen: std::net::SocketAddr,
    /// In priority order: the first healthy one is chosen.
    pub backends: Vec<BackendConfig>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub failback: bool,
    pub when_isolated: WhenIsolated,
    pub connect_timeout: Duration,
    pub splice: bool,
    /// Sessions served at once on this node; more clients wait in the
    /// listen backlog, as with HAProxy's `maxconn`. `None`: a share of the
    /// descriptor limit ([`default_max_sessions`]), known only once the
    /// host raised it.
    pub max_sessions: Option<usize>,
}

/// Sessions a bridge serves at once unless `max_sessions` says: half the
/// descriptor limit at six descriptors a session (two sockets, two pipes),
/// at least 64.
pub fn default_max_sessions() -> usize {
    hivemind_core::limits::connection_cap(12, 64, usize::MAX)
}

/// What a bridge does while its node cannot reach a quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenIsolated {
    /// Keep routing to the last committed active backend.
    Keep,
    /// Refuse clients and sever sessions until the quorum is back.
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    /// `host:port` sessions connect to.
    pub address: String,
    pub check: HealthCheck,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheck {
    /// A TCP connection to `address` opens.
    Tcp { address: String },
    /// `GET http://address/path` answers 2xx and, when `json` is set, the
    /// JSON body's field equals the value.
    Http {
        address: String,
        path: String,
        json: Option<(String, serde_json::Value)>,
    },
}

impl HealthCheck {
    /// `tcp HOST:PORT` or `http http://HOST:PORT/PATH`, as status shows it.
    pub fn describe(&self) -> String {
        match self {
            HealthCheck::Tcp { address } => format!("tcp {address}"),
            HealthCheck::Http { address, path, json } => match json {
                None => format!("http http://{address}{path}"),
                Some((field, value)) => format!("http http://{address}{path} with {field} = {value}"),
            },
        }
    }
}

/// Checks a HAProxy user would recognise: every half second, down after
/// two failures in a row, so a dead backend is replaced in about a second.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_address(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0),
        None => false,
    }
}

impl BridgeSection {
    /// Resolves defaults and checks every field; errors name the bridge and
    /// the key.
    pub fn resolve(&self) -> anyhow::Result<BridgeConfig> {
        let name = &self.name;
        anyhow::ensure!(
            valid_name(name),
            "[[bridge]] name = {name:?}: use 1-64 letters, digits, '-' or '_'"
        );
        let at = |key: &str| format!("[[bridge]] {name:?}: {key}");
        let listen = self.listen.parse().map_err(|error| {
            anyhow::anyhow!(
                "{}: {:?} is not an address like 127.0.0.1:15432 ({error})",
                at("listen"),
                self.listen
            )
        })?;
        anyhow::ensure!(
            !self.backends.is_empty(),
            "{}: add at least one [[bridge.backends]] with name and address",
            at("backends")
        );
        let mut backends = Vec::new();
        for backend in &self.backends {
            let backend = backend.resolve(name)?;
            anyhow::ensure!(
                !backends.iter().any(|seen: &BackendConfig| seen.name == backend.name),
                "{}: backend {:?} is listed twice",
                at("backends"),
                backend.name
            );
            backends.push(backend);
        }
        let interval = self.interval_ms.map(Duration::from_millis).unwrap_or(DEFAULT_INTERVAL);
        let timeout = self.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_TIMEOUT);
        anyhow::ensure!(
            interval >= Duration::from_millis(50),
            "{}: {} ms is too often; use at least 50",
            at("interval_ms"),
            interval.as_millis()
        );
        anyhow::ensure!(!timeout.is_zero(), "{}: must be at least 1", at("timeout_ms"));
        let rise = self.rise.unwrap_or(DEFAULT_RISE);
        let fall = self.fall.unwrap_or(DEFAULT_FALL);
        anyhow::ensure!(rise >= 1, "{}: must be at least 1", at("rise"));
        anyhow::ensure!(fall >= 1, "{}: must be at least 1", at("fall"));
        let when_isolated = match self.when_isolated.as_deref() {
            None | Some("keep") => WhenIsolated::Keep,
            Some("stop") => WhenIsolated::Stop,
            Some(other) => anyhow::bail!("{}: {other:?} is not \"keep\" or \"stop\"", at("when_isolated")),
        };
        let connect_timeout = self
            .connect_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        anyhow::ensure!(
            !connect_timeout.is_zero(),
            "{}: must be at least 1",
            at("connect_timeout_ms")
        );
        Ok(BridgeConfig {
            name: name.clone(),
            listen,
            backends,
            interval,
            timeout,
            rise,
            fall,
            failback: self.failback.unwrap_or(false),
            when_isolated,
            connect_timeout,
            splice: self.splice.unwrap_or(true),
            max_sessions: match self.max_sessions {
                Some(0) => anyhow::bail!("{}: must be at least 1", at("max_sessions")),
                other => other,
            },
        })
    }
}

impl BackendSection {
    fn resolve(&self, bridge: &str) -> anyhow::Result<BackendConfig> {
        let name = &self.name;
        anyhow::ensure!(
            valid_name(name),
            "[[bridge]] {bridge:?}: backend name = {name:?}: use 1-64 letters, digits, '-' or '_'"
        );
        let at = |key: &str| format!("[[bridge]] {bridge:?}, backend {name:?}: {key}");
        anyhow::ensure!(
            valid_address(&self.address),
            "{}: {:?} is not HOST:PORT (e.g. 10.0.0.1:5432)",
            at("address"),
            self.address
        );
        let check_address = self.check_address.clone().unwrap_or_else(|| self.address.clone());
        anyhow::ensure!(
            valid_address(&check_address),
            "{}: {check_address:?} is not HOST:PORT",
            at("check_address")
        );
        let http_only = [
            ("path", self.path.is_some()),
            ("json_field", self.json_field.is_some()),
            ("json_value", self.json_value.is_some()),
        ];
        let check = match self.check.as_deref() {
            None | Some("tcp") => {
                if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
                    anyhow::bail!("{}: only for check = \"http\"", at(key));
                }
                HealthCheck::Tcp { address: check_address }
            }
            Some("http") => {
                let path = self.path.clone().unwrap_or_else(|| "/".into());
                anyhow::ensure!(path.starts_with('/'), "{}: {path:?} must start with '/'", at("path"));
                let json = match (&self.json_field, &self.json_value) {
                    (None, None) => None,
                    (None, Some(_)) => anyhow::bail!("{}: needs json_field", at("json_value")),
                    (Some(field), value) => {
                        let value = match value {
                            None => serde_json::Value::Bool(true),
                            Some(value) => serde_json::to_value(value)
                                .map_err(|error| anyhow::anyhow!("{}: {error}", at("json_value")))?,
                        };
                        Some((field.clone(), value))
                    }
                };
                HealthCheck::Http {
                    address: check_address,
                    path,
                    json,
                }
            }
            Some(other) => anyhow::bail!("{}: {other:?} is not \"tcp\" or \"http\"", at("check")),
        };
        Ok(BackendConfig {
            name: name.clone(),
            address: self.address.clone(),
            check,
        })
    }
}

/// Resolves every section; bridge names and listen addresses are unique.
pub fn resolve_all(sections: &[BridgeSection]) -> anyhow::Result<Vec<BridgeConfig>> {
    let mut bridges: Vec<BridgeConfig> = Vec::new();
    for section in sections {
        let bridge = section.resolve()?;
        if let Some(other) = bridges.iter().find(|other| other.name == bridge.name) {
            anyhow::bail!("[[bridge]] name = {:?} is used twice", other.name);
        }
        if let Some(other) = bridges.iter().find(|other| other.listen == bridge.listen) {
            anyhow::bail!(
                "[[bridge]] {:?} and {:?} both listen on {}",
                other.name,
                bridge.name,
                bridge.listen
            );
        }
        bridges.push(bridge);
    }
    Ok(bridges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Vec<BridgeConfig>> {
        #[derive(Deserialize)]
        struct File {
            bridge: Vec<BridgeSection>,
        }
        let file: File = toml::from_str(text)?;
        resolve_all(&file.bridge)
    }

    /// A minimal bridge gets the documented defaults.
    #[test]
    fn defaults() {
        let bridges = parse(
            "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n\
             [[bridge.backends]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let bridge = &bridges[0];
        assert_eq!((bridge.interval, bridge.rise, bridge.fall), (DEFAULT_INTERVAL, 2, 2));
        assert!(!bridge.failback && bridge.splice);
        assert_eq!(bridge.when_isolated, WhenIsolated::Keep);
        assert_eq!(
            bridge.backends[0].check,
            HealthCheck::Tcp {
                address: "127.0.0.1:2".into()
            }
        );
    }

    /// An HTTP check with a JSON field and an explicit check address.
    #[test]
    fn http_check_with_json_field() {
        let bridges = parse(
            "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n\
             [[bridge.backends]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\ncheck = \"http\"\n\
             check_address = \"127.0.0.1:3\"\npath = \"/health\"\njson_field = \"role\"\njson_value = \"primary\"\n",
        )
        .unwrap();
        assert_eq!(
            bridges[0].backends[0].check,
            HealthCheck::Http {
                address: "127.0.0.1:3".into(),
                path: "/health".into(),
                json: Some(("role".into(), serde_json::json!("primary"))),
            }
        );
    }

    /// Each mistake is named with its bridge and key.
    #[test]
    fn mistakes_are_named() {
        let backend = "[[bridge.backends]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n";
        for (text, expected) in [
            ("[[bridge]]\nname = \"d b\"\nlisten = \"127.0.0.1:1\"\n".to_string() + backend, "name"),
            ("[[bridge]]\nname = \"db\"\nlisten = \"nowhere\"\n".to_string() + backend, "listen"),
            ("[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n".to_string(), "backends"),
            (
                "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\nmax_sessions = 0\n".to_string() + backend,
                "max_sessions",
            ),
            (
                "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\nwhen_isolated = \"guess\"\n".to_string() + backend,
                "when_isolated",
            ),
            (
                "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n".to_string() + backend + "path = \"/x\"\n",
                "only for check = \"http\"",
            ),
            (
                "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n".to_string() + backend + backend,
                "listed twice",
            ),
            (
                "[[bridge]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\n[[bridge.backends]]\nname = \"a\"\naddress = \"x\"\n"
                    .to_string(),
                "HOST:PORT",
            ),
        ] {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}\n=> {error}");
        }
    }
}
