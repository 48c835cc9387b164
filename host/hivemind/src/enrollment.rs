//! How a node becomes a member at start-up: it forms a cluster of its own,
//! takes part in a bootstrap of 3 or 5 voters, joins an existing cluster, or
//! (every later start) finds its cluster files in the data directory.
//!
//! The outcome is the cluster files (CA, this node's certificate, the
//! cluster id) and how the quorum log should start ([`Formation`]).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hivemind_core::files::{Access, write_file};

use crate::config::{ClusterMode, HostConfig};
use crate::quorum::join::{self, ClusterFiles, Credential, JoinRefused, JoinRequest, Refusal};
use crate::quorum::{Formation, NodeAddress, NodeId, storage};
use crate::store::Store;
use crate::transport::ClusterCa;

/// File in the cluster directory with the secret this node formed the
/// cluster with, until the cluster has recorded it.
const SECRET_FILE: &str = "secret";

/// How long a bootstrap peer keeps asking the seed, which may start later.
const BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(300);
/// How long a joiner retries while the cluster has no leader.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// Cluster files and formation for this start.
pub async fn enroll(
    config: &HostConfig,
    store: &Store,
    id: NodeId,
    address: &NodeAddress,
) -> anyhow::Result<(ClusterFiles, Formation)> {
    let dir = ClusterFiles::dir(&config.data_dir);
    let secret_path = dir.join(SECRET_FILE);
    if let Some(files) = ClusterFiles::load(&dir)? {
        let formation = match (&config.cluster, std::fs::read_to_string(&secret_path)) {
            (ClusterMode::Bootstrap { peers }, Ok(secret)) => Formation::Seed {
                peers: peers.clone(),
                secret: secret.trim().to_string(),
            },
            (_, Ok(secret)) => Formation::Single {
                secret: secret.trim().to_string(),
            },
            _ => Formation::Wait,
        };
        if let ClusterMode::Join { address: target, token } = &config.cluster {
            return rejoin(config, store, id, address, files, target, token.as_deref()).await;
        }
        return Ok((files, formation));
    }
    match &config.cluster {
        ClusterMode::Single => {
            let secret = config
                .secret
                .clone()
                .unwrap_or_else(|| hex::encode(rand::random::<[u8; 24]>()));
            let files = form(store, id, &dir, &secret).await?;
            Ok((files, Formation::Single { secret }))
        }
        ClusterMode::Bootstrap { peers } => {
            let secret = config.secret.clone().context(
                "bootstrapping a cluster needs the cluster secret: pass --secret (or set HIVEMIND_CLUSTER_SECRET), \
                 the same on every peer",
            )?;
            if !peers.contains(&address.transport) {
                bail!(
                    "--peers {} does not include this node's transport address {}: pass --transport (or \
                     --advertise) with the address other peers know this node by",
                    peers.join(","),
                    address.transport
                );
            }
            if peers[0] == address.transport {
                tracing::info!(peers = %peers.join(","), "bootstrap: this node forms the cluster; waiting for the other peers");
                let files = form(store, id, &dir, &secret).await?;
                return Ok((
                    files,
                    Formation::Seed {
                        peers: peers.clone(),
                        secret,
                    },
                ));
            }
            let request = join_request(id, address, None, Some(peers.clone()));
            let credential = Credential::Secret(secret);
            let admission = ask_until_admitted(&peers[0], &credential, request, BOOTSTRAP_PATIENCE).await?;
            save_admission(&admission, &dir)?;
            Ok((ClusterFiles::from_admission(&admission)?, Formation::Wait))
        }
        ClusterMode::Join { address: target, token } => {
            let credential = credential(config, token.as_deref())?;
            let (cluster_id, epoch) = data_of(store).await?;
            let request = join_request(id, address, cluster_id.map(|id| (id, epoch)), None);
            let admission = join_or_rebootstrap(store, target, &credential, request).await?;
            save_admission(&admission, &dir)?;
            Ok((ClusterFiles::from_admission(&admission)?, Formation::Wait))
        }
    }
}

fn credential(config: &HostConfig, token: Option<&str>) -> anyhow::Result<Credential> {
    match (token, &config.secret) {
        (Some(token), _) => Credential::parse_token(token),
        (None, Some(secret)) => Ok(Credential::Secret(secret.clone())),
        (None, None) => bail!(
            "--join needs a join token (--join-token, from `hivemind members token` on a member) or the cluster \
             secret (--secret or HIVEMIND_CLUSTER_SECRET)"
        ),
    }
}

/// A new cluster of this node: id, CA, this node's certificate.
async fn form(store: &Store, id: NodeId, dir: &Path, secret: &str) -> anyhow::Result<ClusterFiles> {
    // A store from before cluster files existed keeps the id it recorded.
    let (existing, _) = data_of(store).await?;
    let cluster_id = existing.unwrap_or_else(|| hex::encode(rand::random::<[u8; 8]>()));
    let ca = ClusterCa::generate(&cluster_id)?;
    let identity = ca.issue(&format!("{id:016x}"))?;
    let files = ClusterFiles {
        cluster_id,
        ca,
        identity,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_file(&dir.join(SECRET_FILE), secret.as_bytes(), Access::Private)?;
    files.save(dir)?;
    tracing::info!(cluster = %files.cluster_id, "formed a new cluster");
    Ok(files)
}

/// The cluster id and epoch of the Raft state in `store`, if any.
async fn data_of(store: &Store) -> anyhow::Result<(Option<String>, u64)> {
    let state = store
        .blocking(|store| Ok(storage::read_cluster(&*store.database()?).map_err(|error| error.to_string())))
        .await?
        .map_err(|error| anyhow::anyhow!("cannot read the cluster state: {error}"))?;
    Ok(((!state.cluster_id.is_empty()).then_some(state.cluster_id), state.epoch))
}

fn join_request(
    id: NodeId,
    address: &NodeAddress,
    data: Option<(String, u64)>,
    bootstrap_peers: Option<Vec<String>>,
) -> JoinRequest {
    JoinRequest {
        id,
        address: address.clone(),
        token: None,
        proof: String::new(),
        epoch: data.as_ref().map(|(_, epoch)| *epoch),
        cluster_id: data.map(|(cluster_id, _)| cluster_id),
        bootstrap_peers,
    }
}

/// Asks `target` until admitted, retrying while it is unreachable or not
/// ready, for up to `patience`. Any other refusal is final.
async fn ask_until_admitted(
    target: &str,
    credential: &Credential,
    request: JoinRequest,
    patience: Duration,
) -> anyhow::Result<join::Admission> {
    let started = Instant::now();
    let mut last_note = Instant::now() - Duration::from_secs(60);
    loop {
        let error = match join::request_join(target, credential, request.clone(), ASK_TIMEOUT).await {
            Ok(admission) => {
                tracing::info!(cluster = %admission.cluster_id, epoch = admission.epoch, via = target, "admitted to the cluster");
                return Ok(admission);
            }
            Err(error) => error,
        };
        let retry = match error.downcast_ref::<JoinRefused>() {
            Some(refused) => refused.kind == Refusal::NotReady,
            None => true,
        };
        if !retry || started.elapsed() > patience {
            return Err(error);
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            tracing::info!(target, error = %format!("{error:#}"), "waiting to be admitted; retrying");
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Joins; if the cluster says this node's data is from a stale epoch, drops
/// its cluster state and joins afresh (it then catches up from a snapshot).
async fn join_or_rebootstrap(
    store: &Store,
    target: &str,
    credential: &Credential,
    request: JoinRequest,
) -> anyhow::Result<join::Admission> {
    match ask_until_admitted(target, credential, request.clone(), JOIN_PATIENCE).await {
        Err(error)
            if error
                .downcast_ref::<JoinRefused>()
                .is_some_and(|refused| refused.kind == Refusal::StaleEpoch) =>
        {
            tracing::warn!(error = %format!("{error:#}"), "dropping this node's cluster state to join afresh");
            store
                .blocking(|store| Ok(storage::reset(store).map_err(|error| error.to_string())))
                .await?
                .map_err(|error| anyhow::anyhow!("cannot drop the stale cluster state: {error}"))?;
            let fresh = JoinRequest { epoch: None, ..request };
            ask_until_admitted(target, credential, fresh, JOIN_PATIENCE).await
        }
        other => other,
    }
}

/// `--join` given to a node that already has cluster files: it asks again,
/// which re-checks its standing. A member carries on; a node of another
/// cluster is refused; a node removed at an older epoch drops its state and
/// joins afresh. An unreachable target is not fatal: the node is a member.
async fn rejoin(
    config: &HostConfig,
    store: &Store,
    id: NodeId,
    address: &NodeAddress,
    files: ClusterFiles,
    target: &str,
    token: Option<&str>,
) -> anyhow::Result<(ClusterFiles, Formation)> {
    let credential = match credential(config, token) {
        Ok(credential) => credential,
        Err(_) => return Ok((files, Formation::Wait)),
    };
    let (_, epoch) = data_of(store).await?;
    let request = join_request(id, address, Some((files.cluster_id.clone(), epoch)), None);
    let dir = ClusterFiles::dir(&config.data_dir);
    match join::request_join(target, &credential, request.clone(), ASK_TIMEOUT).await {
        Ok(_) => Ok((files, Formation::Wait)),
        Err(error) => match error.downcast_ref::<JoinRefused>().map(|refused| refused.kind) {
            Some(Refusal::StaleEpoch) => {
                let admission = join_or_rebootstrap(store, target, &credential, request).await?;
                save_admission(&admission, &dir)?;
                Ok((ClusterFiles::from_admission(&admission)?, Formation::Wait))
            }
            Some(Refusal::UnknownCluster | Refusal::WrongCredential) => Err(error),
            _ => {
                tracing::warn!(error = %format!("{error:#}"), "could not re-check membership; starting with this node's cluster files");
                Ok((files, Formation::Wait))
            }
        },
    }
}

fn save_admission(admission: &join::Admission, dir: &Path) -> anyhow::Result<()> {
    ClusterFiles::from_admission(admission)?
        .save(dir)
        .with_context(|| format!("cannot save the cluster files in {}", dir.display()))
}
