//! What a node was started as: its name, its addresses and its roles
//! directory, written to `DATA_DIR/node.toml` by every start, so that a
//! later start with no flags comes back as the same node rather than as
//! one named after the host name on the default ports.
//!
//! The file is a layer of its own: flags over the config file over this
//! file over the defaults. The name and the transport addresses are how
//! the cluster knows the node (its DNS name, the address others dial), so
//! a start that gives others is refused, with the way to really move the
//! node; the API address and the roles directory are this machine's
//! business and may change, which the log notes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::bail;
use hivemind_core::files::{Access, write_file};
use serde::{Deserialize, Serialize};

use crate::config::{FileConfig, HostConfig};

/// The file in the data directory.
pub const SAVED_NODE_FILE: &str = "node.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedNode {
    pub node_name: String,
    pub api: String,
    pub transport: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Only when not `DATA_DIR/roles`, so a data directory moved whole
    /// keeps its roles beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_dir: Option<PathBuf>,
}

impl SavedNode {
    /// What `config` runs as.
    pub fn of(config: &HostConfig) -> SavedNode {
        SavedNode {
            node_name: config.node_name.clone(),
            api: config.api.to_string(),
            transport: config.transport.to_string(),
            advertise: config.advertise.clone(),
            roles_dir: (config.roles_dir != config.data_dir.join("roles")).then(|| config.roles_dir.clone()),
        }
    }

    /// The record in `data_dir`, if a host ever started there.
    pub fn read(data_dir: &Path) -> anyhow::Result<Option<SavedNode>> {
        let path = data_dir.join(SAVED_NODE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => bail!("cannot read {}: {error}", path.display()),
        };
        toml::from_str(&text).map(Some).map_err(|error| {
            anyhow::anyhow!(
                "{}: {error}\nThe file records what this node was started as: mend it, or remove it to start \
                 with the flags and defaults as they are",
                path.display()
            )
        })
    }

    /// Writes the record into `data_dir` unless it is there already.
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        if Self::read(data_dir).ok().flatten().as_ref() == Some(self) {
            return Ok(());
        }
        let text = toml::to_string(self)?;
        let text = format!("# What this node was started as; later starts without flags use it.\n{text}");
        write_file(&data_dir.join(SAVED_NODE_FILE), text.as_bytes(), Access::Shared)?;
        Ok(())
    }

    /// Fills what `given` (the config file and the flags) leaves unset from
    /// this record. Refuses a name or transport address other than the
    /// record's; returns a note for each local setting that changes.
    pub fn fill_in(&self, given: &mut FileConfig, data_dir: &Path) -> anyhow::Result<Vec<String>> {
        let file = data_dir.join(SAVED_NODE_FILE);
        let moving = "a node keeps its name and transport address for life: to change them, remove it \
                      (`hivemind members remove NAME`) and join it again with a new data directory";
        let mut notes = Vec::new();
        match &given.node_name {
            Some(name) if name != &self.node_name => bail!(
                "this node was started as `{}` ({}), and the cluster knows it by that name; it is now given `{name}`. \
                 Start it without --node-name, or with `{}`; {moving}",
                self.node_name,
                file.display(),
                self.node_name
            ),
            Some(_) => {}
            None => given.node_name = Some(self.node_name.clone()),
        }
        match &given.transport {
            Some(transport) if !same_address(transport, &self.transport) => bail!(
                "this node's transport was {} ({}), the address the cluster dials; it is now given {transport}. \
                 Start it without --transport, or with {}; {moving}",
                self.transport,
                file.display(),
                self.transport
            ),
            Some(_) => {}
            None => given.transport = Some(self.transport.clone()),
        }
        match &given.advertise {
            Some(advertise) if self.advertise.as_deref() != Some(advertise.as_str()) => bail!(
                "this node was advertised at {} ({}), the address the cluster dials; it is now given --advertise \
                 {advertise}. Start it without --advertise; {moving}",
                self.advertise.as_deref().unwrap_or("its transport address"),
                file.display()
            ),
            Some(_) => {}
            None => given.advertise.clone_from(&self.advertise),
        }
        match &given.api {
            Some(api) if !same_address(api, &self.api) => {
                notes.push(format!("the API moves from {} to {api}", self.api));
            }
            Some(_) => {}
            None => given.api = Some(self.api.clone()),
        }
        match (&given.roles_dir, &self.roles_dir) {
            (Some(dir), saved) if Some(dir) != saved.as_ref() => {
                notes.push(format!("the roles directory is now {}", dir.display()));
            }
            (Some(_), _) => {}
            (None, saved) => given.roles_dir.clone_from(saved),
        }
        Ok(notes)
    }
}

/// Whether two address texts name the same socket address (`127.0.0.1:80`
/// and `127.0.0.1:080` do); texts that do not parse compare as text, and
/// the config's own check names them later.
fn same_address(one: &str, other: &str) -> bool {
    match (one.parse::<SocketAddr>(), other.parse::<SocketAddr>()) {
        (Ok(one), Ok(other)) => one == other,
        _ => one == other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> SavedNode {
        SavedNode {
            node_name: "n2".into(),
            api: "127.0.0.1:7486".into(),
            transport: "127.0.0.1:7482".into(),
            advertise: None,
            roles_dir: None,
        }
    }

    /// A start that gives nothing takes the name, addresses and roles
    /// directory the node had.
    #[test]
    fn an_empty_start_comes_back_as_the_same_node() {
        let mut given = FileConfig::default();
        let notes = saved().fill_in(&mut given, Path::new("/data")).unwrap();
        assert!(notes.is_empty());
        assert_eq!(given.node_name.as_deref(), Some("n2"));
        assert_eq!(given.api.as_deref(), Some("127.0.0.1:7486"));
        assert_eq!(given.transport.as_deref(), Some("127.0.0.1:7482"));
        assert_eq!(given.roles_dir, None, "DATA_DIR/roles stays the default");
    }

    /// Another name or transport address is refused, naming the file, what
    /// the node was, and how to really move it.
    #[test]
    fn another_name_or_transport_is_refused() {
        let mut given = FileConfig {
            node_name: Some("impostor".into()),
            ..FileConfig::default()
        };
        let error = saved().fill_in(&mut given, Path::new("/data")).unwrap_err().to_string();
        assert!(error.contains("`n2`") && error.contains("/data/node.toml") && error.contains("members remove"));

        let mut given = FileConfig {
            transport: Some("127.0.0.1:9999".into()),
            ..FileConfig::default()
        };
        let error = saved().fill_in(&mut given, Path::new("/data")).unwrap_err().to_string();
        assert!(error.contains("127.0.0.1:7482"), "{error}");

        let mut given = FileConfig {
            node_name: Some("n2".into()),
            transport: Some("127.0.0.1:7482".into()),
            ..FileConfig::default()
        };
        assert!(
            saved().fill_in(&mut given, Path::new("/data")).is_ok(),
            "the same values are fine"
        );
    }

    /// A new API address or roles directory is taken, with a note.
    #[test]
    fn local_settings_may_change() {
        let mut given = FileConfig {
            api: Some("127.0.0.1:9000".into()),
            roles_dir: Some("/srv/roles".into()),
            ..FileConfig::default()
        };
        let notes = saved().fill_in(&mut given, Path::new("/data")).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(given.api.as_deref(), Some("127.0.0.1:9000"));
    }

    /// The record survives a write and a read, and a broken one is an error
    /// naming the file and the fix.
    #[test]
    fn saves_reads_and_names_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SavedNode::read(dir.path()).unwrap(), None);
        saved().save(dir.path()).unwrap();
        assert_eq!(SavedNode::read(dir.path()).unwrap(), Some(saved()));
        std::fs::write(dir.path().join(SAVED_NODE_FILE), "node_name = 3\n").unwrap();
        let error = SavedNode::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("node.toml") && error.contains("remove it"), "{error}");
    }
}
