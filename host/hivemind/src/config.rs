//! The host's configuration: the TOML file given to `hivemind up --config`,
//! overridden by command-line flags. Every key is optional; the defaults give
//! a one-node cluster on loopback.
//!
//! The example below is `hivemind up --help`'s too, and a test loads it:
#![doc = concat!("```toml\n", include_str!("config-example.toml"), "```")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::saved_node::SavedNode;

/// The API's default address: loopback, a port unlikely to be taken.
pub const DEFAULT_API: &str = "127.0.0.1:7480";
/// The node-to-node transport's default address: the port after the API's.
pub const DEFAULT_TRANSPORT: &str = "127.0.0.1:7481";

/// Periodic rescans catch what the file watcher missed (inotify drops events
/// under load); two seconds bounds that delay without measurable cost.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub roles_dir: Option<PathBuf>,
    pub api: Option<String>,
    pub transport: Option<String>,
    pub advertise: Option<String>,
    pub node_name: Option<String>,
    pub install_bundled_roles: Option<bool>,
    pub rescan_secs: Option<u64>,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub gossip: GossipSection,
    #[serde(default)]
    pub data_plane: DataPlaneSection,
    #[serde(default)]
    pub bridge: Vec<crate::bridge::config::BridgeSection>,
}

impl FileConfig {
    /// The file at `path`, or no keys at all without one.
    pub fn read(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| anyhow::anyhow!("cannot read config {}: {error}", path.display()))?;
        toml::from_str::<FileConfig>(&text).map_err(|error| anyhow::anyhow!("config {}: {error}", path.display()))
    }

    /// `flags` over `self`: each key the flags give replaces the file's. A
    /// bootstrap or join from the flags replaces the file's whole way in.
    pub fn overridden_by(mut self, flags: FileConfig) -> FileConfig {
        fn take<T>(mine: &mut Option<T>, theirs: Option<T>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        take(&mut self.data_dir, flags.data_dir);
        take(&mut self.roles_dir, flags.roles_dir);
        take(&mut self.api, flags.api);
        take(&mut self.transport, flags.transport);
        take(&mut self.advertise, flags.advertise);
        take(&mut self.node_name, flags.node_name);
        take(&mut self.install_bundled_roles, flags.install_bundled_roles);
        take(&mut self.cluster.secret, flags.cluster.secret);
        take(&mut self.gossip.preset, flags.gossip.preset);
        if !flags.cluster.bootstrap_peers.is_empty() || flags.cluster.join.is_some() {
            self.cluster.bootstrap_peers = flags.cluster.bootstrap_peers;
            self.cluster.join = flags.cluster.join;
            self.cluster.join_token = flags.cluster.join_token;
        }
        self
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlaneSection {
    pub threads: Option<usize>,
    pub busy_poll_us: Option<u64>,
}

/// The bridges' data-plane threads.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPlaneSettings {
    pub threads: usize,
    /// How long a thread polls after its last I/O before it sleeps.
    pub busy_poll: Duration,
}

/// A longer window keeps a thread polling through pauses that are not a
/// session's turn-around any more; 10 ms is already far past that.
const MAX_BUSY_POLL_US: u64 = 10_000;

impl Default for DataPlaneSettings {
    fn default() -> DataPlaneSettings {
        DataPlaneSettings {
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            busy_poll: crate::bridge::busy_poll::DEFAULT_WINDOW,
        }
    }
}

impl DataPlaneSection {
    fn settings(&self) -> anyhow::Result<DataPlaneSettings> {
        let defaults = DataPlaneSettings::default();
        if self.threads == Some(0) {
            anyhow::bail!("[data_plane] threads = 0; give at least 1, or leave it out for one per CPU core");
        }
        if let Some(micros) = self.busy_poll_us
            && micros > MAX_BUSY_POLL_US
        {
            anyhow::bail!(
                "[data_plane] busy_poll_us = {micros} is more than {MAX_BUSY_POLL_US}; a window of tens of µs \
                 covers a session's turn-around (0 turns busy polling off)"
            );
        }
        Ok(DataPlaneSettings {
            threads: self.threads.unwrap_or(defaults.threads),
            busy_poll: self
                .busy_poll_us
                .map(Duration::from_micros)
                .unwrap_or(defaults.busy_poll),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipSection {
    /// `lan` (default) or `fast` (tests on one machine).
    pub preset: Option<String>,
    pub failed_grace_ms: Option<u64>,
}

/// Gossip timing and the leader's patience before deciding a node failed.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    pub preset: crate::membership::GossipPreset,
    /// How long gossip must hold a member down before the leader commits
    /// `node.failed`. Suspicion already filtered flapping, so this is short:
    /// half a second absorbs a leader that just took over with a stale view.
    pub failed_grace: Duration,
}

impl Default for GossipSettings {
    fn default() -> Self {
        GossipSettings {
            preset: crate::membership::GossipPreset::Lan,
            failed_grace: Duration::from_millis(500),
        }
    }
}

impl GossipSection {
    fn settings(&self) -> anyhow::Result<GossipSettings> {
        let defaults = GossipSettings::default();
        let preset = match &self.preset {
            None => defaults.preset,
            Some(name) => crate::membership::GossipPreset::parse(name)
                .ok_or_else(|| anyhow::anyhow!("[gossip] preset = \"{name}\" is not one of \"lan\", \"fast\""))?,
        };
        Ok(GossipSettings {
            preset,
            failed_grace: self
                .failed_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.failed_grace),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    pub heartbeat_ms: Option<u64>,
    pub election_min_ms: Option<u64>,
    pub election_max_ms: Option<u64>,
    pub snapshot_every: Option<u64>,
}

impl RaftSection {
    fn timing(&self) -> anyhow::Result<crate::quorum::Timing> {
        let defaults = crate::quorum::Timing::default();
        let ms = |value: Option<u64>, default: Duration| value.map(Duration::from_millis).unwrap_or(default);
        let timing = crate::quorum::Timing {
            heartbeat: ms(self.heartbeat_ms, defaults.heartbeat),
            election_min: ms(self.election_min_ms, defaults.election_min),
            election_max: ms(self.election_max_ms, defaults.election_max),
            snapshot_every: self.snapshot_every.unwrap_or(defaults.snapshot_every),
        };
        anyhow::ensure!(
            timing.heartbeat < timing.election_min && timing.election_min < timing.election_max,
            "[raft] needs heartbeat_ms < election_min_ms < election_max_ms; with the defaults filled in they are {} / {} / {}",
            timing.heartbeat.as_millis(),
            timing.election_min.as_millis(),
            timing.election_max.as_millis()
        );
        anyhow::ensure!(timing.snapshot_every > 0, "[raft] snapshot_every must be at least 1");
        Ok(timing)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub secret: Option<String>,
    #[serde(default)]
    pub bootstrap_peers: Vec<String>,
    pub join: Option<String>,
    pub join_token: Option<String>,
}

/// How this node gets into a cluster the first time it starts (later
/// starts use the cluster files in the data directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMode {
    /// A one-voter cluster of this node; others may join it later.
    Single,
    /// Form a cluster of these voters (sorted transport addresses).
    Bootstrap { peers: Vec<String> },
    /// Join the cluster of the node at `address` as a learner.
    Join { address: String, token: Option<String> },
}

impl ClusterMode {
    /// Checks a combination of bootstrap peers, join address and token.
    pub fn from_parts(peers: Vec<String>, join: Option<String>, token: Option<String>) -> anyhow::Result<ClusterMode> {
        match (peers.is_empty(), join) {
            (false, Some(_)) => anyhow::bail!("bootstrap peers and --join exclude each other: pick one"),
            (false, None) => {
                anyhow::ensure!(token.is_none(), "a join token is for --join, not for bootstrap peers");
                let mut peers: Vec<String> = peers.into_iter().map(|peer| peer.trim().to_string()).collect();
                for peer in &peers {
                    peer.parse::<SocketAddr>().map_err(|error| {
                        anyhow::anyhow!("bootstrap peer {peer:?} is not an address like 10.0.0.5:7481 ({error})")
                    })?;
                }
                peers.sort();
                peers.dedup();
                anyhow::ensure!(
                    peers.len() == 3 || peers.len() == 5,
                    "bootstrap peers: give 3 or 5 transport addresses (got {}); a cluster of another size tolerates                      no more failures than the odd one below it",
                    peers.len()
                );
                Ok(ClusterMode::Bootstrap { peers })
            }
            (true, Some(address)) => Ok(ClusterMode::Join { address, token }),
            (true, None) => {
                anyhow::ensure!(token.is_none(), "a join token needs --join ADDR: the node to ask");
                Ok(ClusterMode::Single)
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    pub pool_instances: Option<u32>,
    pub max_role_memory_mb: Option<u64>,
}

/// The resolved configuration a host runs with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub data_dir: PathBuf,
    pub roles_dir: PathBuf,
    pub api: SocketAddr,
    /// Node-to-node transport address to bind.
    pub transport: SocketAddr,
    /// Transport address other nodes use, when not the bound one.
    pub advertise: Option<String>,
    pub cluster: ClusterMode,
    /// The cluster secret, when given.
    pub secret: Option<String>,
    pub node_name: String,
    pub install_bundled_roles: bool,
    pub rescan: Duration,
    pub webhook: Option<String>,
    pub pool_instances: u32,
    pub max_role_memory_bytes: u64,
    /// Raft timing and snapshot threshold.
    pub raft: crate::quorum::Timing,
    pub gossip: GossipSettings,
    pub data_plane: DataPlaneSettings,
    pub bridges: Vec<crate::bridge::config::BridgeConfig>,
}

impl HostConfig {
    /// Defaults for a host whose data lives in `data_dir`: API on an
    /// ephemeral loopback port and no bundled roles — what tests want.
    pub fn for_tests(data_dir: &Path) -> HostConfig {
        HostConfig {
            data_dir: data_dir.to_path_buf(),
            roles_dir: data_dir.join("roles"),
            api: "127.0.0.1:0".parse().unwrap(),
            transport: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            cluster: ClusterMode::Single,
            secret: None,
            node_name: "test-node".into(),
            install_bundled_roles: false,
            rescan: Duration::from_millis(500),
            webhook: None,
            pool_instances: 64,
            max_role_memory_bytes: hivemind_runtime::RuntimeConfig::new("").pool_max_memory_bytes,
            raft: crate::quorum::Timing::default(),
            gossip: GossipSettings {
                preset: crate::membership::GossipPreset::Fast,
                failed_grace: Duration::from_millis(200),
            },
            data_plane: DataPlaneSettings::default(),
            bridges: Vec::new(),
        }
    }

    /// Reads `path` (if given) and resolves every default.
    pub fn load(path: Option<&Path>) -> anyhow::Result<HostConfig> {
        Self::resolve_naming(path, FileConfig::read(path)?)
    }

    /// What `hivemind up` runs with: `flags` over the config file at
    /// `path`, over what the node saved in its data directory
    /// ([`SavedNode`]), over the defaults. Returns the notes to log about
    /// settings that changed since the last start.
    pub fn load_for_start(path: Option<&Path>, flags: FileConfig) -> anyhow::Result<(HostConfig, Vec<String>)> {
        let mut given = FileConfig::read(path)?.overridden_by(flags);
        let data_dir = given.data_dir.clone().unwrap_or_else(default_data_dir);
        let notes = match SavedNode::read(&data_dir)? {
            Some(saved) => saved.fill_in(&mut given, &data_dir)?,
            None => Vec::new(),
        };
        Ok((Self::resolve_naming(path, given)?, notes))
    }

    /// Every mistake found past parsing names the file too, the way the
    /// parser's own errors do.
    fn resolve_naming(path: Option<&Path>, file: FileConfig) -> anyhow::Result<HostConfig> {
        Self::resolve(file).map_err(|error| match path {
            Some(path) => anyhow::anyhow!("config {}: {error}", path.display()),
            None => anyhow::anyhow!("config: {error}"),
        })
    }

    fn resolve(file: FileConfig) -> anyhow::Result<HostConfig> {
        let data_dir = file.data_dir.unwrap_or_else(default_data_dir);
        let api_text = file.api.unwrap_or_else(|| DEFAULT_API.to_string());
        let api = api_text.parse().map_err(|error| {
            anyhow::anyhow!("key `api`: {api_text:?} is not an address like 127.0.0.1:7480 ({error})")
        })?;
        let transport_text = file.transport.unwrap_or_else(|| DEFAULT_TRANSPORT.to_string());
        let transport = transport_text.parse().map_err(|error| {
            anyhow::anyhow!("key `transport`: {transport_text:?} is not an address like 127.0.0.1:7481 ({error})")
        })?;
        let cluster = ClusterMode::from_parts(file.cluster.bootstrap_peers, file.cluster.join, file.cluster.join_token)
            .map_err(|error| anyhow::anyhow!("[cluster] {error}"))?;
        let runtime_defaults = hivemind_runtime::RuntimeConfig::new("");
        let bridges = crate::bridge::config::resolve_all(&file.bridge)?;
        Ok(HostConfig {
            transport,
            advertise: file.advertise,
            cluster,
            secret: file.cluster.secret,
            roles_dir: file.roles_dir.unwrap_or_else(|| data_dir.join("roles")),
            data_dir,
            api,
            node_name: file.node_name.unwrap_or_else(default_node_name),
            install_bundled_roles: file.install_bundled_roles.unwrap_or(true),
            rescan: file.rescan_secs.map(Duration::from_secs).unwrap_or(DEFAULT_RESCAN),
            webhook: file.notify.webhook,
            pool_instances: file.runtime.pool_instances.unwrap_or(runtime_defaults.pool_instances),
            max_role_memory_bytes: file
                .runtime
                .max_role_memory_mb
                .map(|mb| mb << 20)
                .unwrap_or(runtime_defaults.pool_max_memory_bytes),
            raft: file.raft.timing()?,
            gossip: file.gossip.settings()?,
            data_plane: file.data_plane.settings()?,
            bridges,
        })
    }
}

/// `$HIVEMIND_DATA_DIR`, else `$XDG_DATA_HOME/hivemind`, else
/// `~/.local/share/hivemind`, else `./hivemind-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HIVEMIND_DATA_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("hivemind");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/hivemind"),
        None => PathBuf::from("hivemind-data"),
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "hivemind".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt key in the host config is an error naming the file, line and key.
    #[test]
    fn unknown_config_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hivemind.toml");
        std::fs::write(&path, "api = \"127.0.0.1:1\"\nrole_dir = \"/tmp\"\n").unwrap();
        let error = HostConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("hivemind.toml") && error.contains("line 2") && error.contains("role_dir"),
            "{error}"
        );
    }

    /// A value that parses but cannot be used is an error naming the file
    /// and the key, whichever section it is in.
    #[test]
    fn unusable_values_name_the_file_and_key() {
        for (text, key) in [
            ("api = \"nonsense\"\n", "key `api`"),
            ("[data_plane]\nthreads = 0\n", "[data_plane] threads"),
            ("[gossip]\npreset = \"wan\"\n", "[gossip] preset"),
            ("[raft]\nheartbeat_ms = 900\n", "[raft] needs heartbeat_ms"),
        ] {
            let error = load_text(text).unwrap_err().to_string();
            assert!(
                error.starts_with("config ") && error.contains("hivemind.toml: ") && error.contains(key),
                "{text:?}: {error}"
            );
        }
    }

    /// The annotated example that `hivemind up --help` prints is a config
    /// the host accepts, and sets what it says.
    #[test]
    fn the_documented_example_loads() {
        let config = load_text(include_str!("config-example.toml")).unwrap();
        assert_eq!(config.node_name, "web-1");
        assert_eq!(config.data_plane.threads, 4);
        assert_eq!(config.bridges.len(), 1);
        assert_eq!(config.bridges[0].backends.len(), 2);
        assert!(
            matches!(config.cluster, ClusterMode::Bootstrap { .. }),
            "{:?}",
            config.cluster
        );
    }

    /// No config file gives loopback defaults.
    #[test]
    fn defaults_are_loopback() {
        let config = HostConfig::load(None).unwrap();
        assert_eq!(config.api.to_string(), DEFAULT_API);
        assert!(config.install_bundled_roles);
        assert_eq!(config.roles_dir, config.data_dir.join("roles"));
    }

    fn load_text(text: &str) -> anyhow::Result<HostConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hivemind.toml");
        std::fs::write(&path, text).unwrap();
        HostConfig::load(Some(&path))
    }

    /// `[data_plane]` sets the thread count and the busy-poll window;
    /// without it, one thread per core polls for 50 µs.
    #[test]
    fn data_plane_settings_and_defaults() {
        let defaults = HostConfig::load(None).unwrap().data_plane;
        assert_eq!(defaults.busy_poll, Duration::from_micros(50));
        assert_eq!(
            defaults.threads,
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        let set = load_text("[data_plane]\nthreads = 3\nbusy_poll_us = 0\n")
            .unwrap()
            .data_plane;
        assert_eq!(
            set,
            DataPlaneSettings {
                threads: 3,
                busy_poll: Duration::ZERO
            }
        );
    }

    /// No threads, or a window far past any turn-around, is an error that
    /// names the key and what to give instead.
    #[test]
    fn bad_data_plane_settings_are_errors() {
        let error = load_text("[data_plane]\nthreads = 0\n").unwrap_err().to_string();
        assert!(error.contains("threads = 0") && error.contains("at least 1"), "{error}");
        let error = load_text("[data_plane]\nbusy_poll_us = 1000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("busy_poll_us = 1000000") && error.contains("0 turns"),
            "{error}"
        );
    }
}
