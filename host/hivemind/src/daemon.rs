//! Starting and stopping a host: data directory, token, store, runtime, role
//! manager, watcher and API, in that order.
//!
//! Shutdown protocol: [`Daemon::shutdown`] cancels one token that every
//! long-lived task watches; the API drains in-flight requests, the watcher and
//! role tasks stop, then the tasks are awaited, so when it returns nothing of
//! the host is still running. Tests start several daemons in one process on
//! port 0 with [`HostConfig::for_tests`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use hivemind_core::files::{Access, write_file};
use hivemind_runtime::{Runtime, RuntimeConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::{ClusterMode, HostConfig};
use crate::connect::{Connect, ConnectLimits};
use crate::enrollment;
use crate::membership::{self, GossipSetup, Membership, NodeMetadata, Sealer};
use crate::notify::Notifier;
use crate::quorum::frames::ClusterFrames;
use crate::quorum::{NodeAddress, NodeHealth, QuorumLog, QuorumSetup};
use crate::registry::Registry;
use crate::roles::manager::RoleManager;
use crate::roles::services::HostParts;
use crate::roles::watcher;
use crate::saved_node::SavedNode;
use crate::store::Store;
use crate::transport::{self, Isolation, TransportCounters};

/// File in the data directory holding the API token (mode 0600).
pub const TOKEN_FILE: &str = "token";
/// File in the data directory naming the API address, for local clients.
pub const API_ADDR_FILE: &str = "api.addr";
/// How long a stopping node waits for its `node.left` to commit.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Setting: the gossip generation of the last start.
const GENERATION_SETTING: &str = "gossip.generation";

/// Marker: the bundled roles were installed once; never again, so a user
/// who deletes one keeps it deleted.
const BUNDLED_MARKER: &str = "bundled-roles-installed";

pub struct Daemon {
    pub api_addr: SocketAddr,
    /// The transport address other nodes reach this one at.
    pub transport_addr: String,
    pub data_dir: PathBuf,
    pub token: String,
    pub manager: Arc<RoleManager>,
    quorum: Arc<QuorumLog>,
    membership: Membership,
    pub registry: Arc<Registry>,
    store: Store,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Daemon {
    /// Starts the host: store, log, membership, roles, API and bridges.
    ///
    /// The start-up and shutdown futures are boxed, and these functions are
    /// never inlined, so that a crate awaiting them (the binary, every test
    /// that runs a host in-process) calls the host's compiled code instead of
    /// compiling its own copy of every state machine they reach: an `async
    /// fn`'s body is compiled again in each crate that polls it.
    #[inline(never)]
    pub fn start(config: HostConfig) -> BoxFuture<'static, anyhow::Result<Daemon>> {
        Box::pin(Self::start_host(config))
    }

    /// Stops the host and waits for all its tasks. A member of a cluster
    /// of several says goodbye first: `node.left` in the log, then a leave
    /// on gossip, so the others neither wait for a failure detector nor
    /// decide it failed.
    #[inline(never)]
    pub fn shutdown(self) -> BoxFuture<'static, ()> {
        Box::pin(self.shut_down())
    }

    async fn start_host(config: HostConfig) -> anyhow::Result<Daemon> {
        let started = Instant::now();
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        // The store and the cluster files hold the cluster's secrets.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
        }
        std::fs::create_dir_all(&config.roles_dir)
            .with_context(|| format!("cannot create the roles directory {}", config.roles_dir.display()))?;
        let token = read_or_create_random(&data_dir.join(TOKEN_FILE), 32, "API token")?;
        let node_id = read_or_create_random(&data_dir.join("node-id"), 8, "node id")?;
        let store_path = data_dir.join("hivemind.redb");
        // Only the first start decides whether the bundled roles come: a
        // node first started without them stays without them on a restart
        // that does not repeat the flag.
        if config.install_bundled_roles && !store_path.exists() {
            install_bundled_roles(&data_dir, &config.roles_dir)?;
        }

        let store = Store::open(&store_path)?;
        let mut runtime_config = RuntimeConfig::new(data_dir.join("cache"));
        runtime_config.pool_instances = config.pool_instances;
        runtime_config.pool_max_memory_bytes = config.max_role_memory_bytes;
        let runtime = Arc::new(Runtime::new(runtime_config).context("cannot start the WebAssembly runtime")?);

        let listener = tokio::net::TcpListener::bind(config.api).await.with_context(|| {
            format!(
                "cannot listen on {} for the API (pass --api ADDR to pick another)",
                config.api
            )
        })?;
        let api_addr = listener.local_addr()?;
        write_file(
            &data_dir.join(API_ADDR_FILE),
            api_addr.to_string().as_bytes(),
            Access::Shared,
        )?;

        let raft_id = u64::from_str_radix(&node_id, 16).with_context(|| {
            format!(
                "the node id in {} is not 16 hex digits; remove the file to get a new one",
                data_dir.join("node-id").display()
            )
        })?;
        let transport_listener = tokio::net::TcpListener::bind(config.transport).await.with_context(|| {
            format!(
                "cannot listen on {} for the node-to-node transport (pass --transport ADDR to pick another)",
                config.transport
            )
        })?;
        let transport_bound = transport_listener.local_addr()?;
        // Both addresses are bound: this is what the node is, for the next
        // start without flags.
        SavedNode::of(&config).save(&data_dir)?;
        let transport_addr = match &config.advertise {
            Some(advertise) => advertise.clone(),
            None => {
                let bound = transport_listener.local_addr()?;
                if bound.ip().is_unspecified() && config.cluster != ClusterMode::Single {
                    anyhow::bail!(
                        "the transport listens on {bound}, which other nodes cannot dial: pass --advertise ADDR \
                         with this node's reachable transport address"
                    );
                }
                bound.to_string()
            }
        };
        let address = NodeAddress {
            name: config.node_name.clone(),
            transport: transport_addr.clone(),
            api: api_addr.to_string(),
        };
        let store_handle = store.clone();
        let (files, formation) = enrollment::enroll(&config, &store, raft_id, &address).await?;
        let identity = files.identity.clone();
        // Every member holds the CA key and no outsider does: gossip's key.
        let sealer = Sealer::from_secret(files.ca.key_pem().as_bytes());
        let log = QuorumLog::start(QuorumSetup {
            store: store.clone(),
            id: raft_id,
            address: address.clone(),
            timing: config.raft.clone(),
            files,
            formation,
            isolation: Isolation::default(),
        })
        .await
        .context("cannot start the cluster log")?;
        // Before the leader can reach this node: a node back at a stale
        // epoch takes the leader's snapshot rather than the old epoch's log.
        log.resync_if_stale().await;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let transport_counters = Arc::new(TransportCounters::default());
        let role_calls: Arc<std::sync::OnceLock<std::sync::Weak<RoleManager>>> = Default::default();
        let connect_tls = identity
            .connector()
            .context("the node certificate in DATA_DIR/cluster")?;
        tasks.push(tokio::spawn(transport::serve(
            transport_listener,
            identity
                .acceptor()
                .context("the node certificate in DATA_DIR/cluster")?,
            Arc::new(ClusterFrames {
                log: log.clone(),
                roles: role_calls.clone(),
            }),
            transport_counters,
            Isolation::default(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(log.clone().watch_peers(shutdown.clone())));
        tasks.push(tokio::spawn(log.clone().watch_core(shutdown.clone())));
        tasks.push(tokio::spawn(log.clone().finish_forming(shutdown.clone())));

        let (membership, gossip_task) =
            start_gossip(&config, &store, transport_bound, &address, raft_id, sealer, &shutdown).await?;
        tasks.push(gossip_task);
        let registry = Arc::new(Registry::new(raft_id, address.clone()));
        let connect = Connect::new(registry.clone(), connect_tls, ConnectLimits::default());
        tasks.push(tokio::spawn(connect.clone().maintain(shutdown.clone())));
        let (local_roles, roles_seen) = tokio::sync::watch::channel(Vec::new());
        tasks.push(tokio::spawn(membership::upkeep::keep_registry(
            registry.clone(),
            log.clone(),
            membership.clone(),
            roles_seen,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(membership::upkeep::decide_health(
            log.clone(),
            membership.clone(),
            config.gossip.clone(),
            shutdown.clone(),
        )));
        let (bridges, bridge_tasks) = crate::bridge::Bridges::start(
            config.bridges.clone(),
            &config.data_plane,
            log.clone(),
            config.node_name.clone(),
            &shutdown,
        )
        .await?;
        tasks.extend(bridge_tasks);
        let notifier = Arc::new(Notifier::new(node_id, config.webhook.clone()));
        let metrics = crate::metrics::NodeMetrics::new(log.writes.seconds.clone(), log.writes.failures.clone());
        let parts = HostParts {
            log: log.clone() as Arc<dyn crate::log::EventLog>,
            store,
            registry: registry.clone(),
            connect: connect.clone(),
            local_roles,
            notifier: notifier.clone(),
            metrics: metrics.clone(),
        };
        let manager = RoleManager::new(runtime, parts, config.roles_dir.clone(), shutdown.clone());
        let _ = role_calls.set(Arc::downgrade(&manager));
        tasks.push(tokio::spawn(watcher::watch_roles_dir(
            manager.clone(),
            config.rescan,
            shutdown.clone(),
        )));
        let app = api::router(ApiState {
            manager: manager.clone(),
            log: log.clone(),
            quorum: log.clone(),
            registry: registry.clone(),
            membership: membership.clone(),
            connect,
            notifier,
            bridges,
            metrics,
            token: token.clone().into(),
            started,
            shutdown: shutdown.clone(),
        });
        let api_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            crate::api_server::serve(listener, app, crate::api_server::default_slots(), api_shutdown).await;
        }));
        // The dashboard's link with the token is `hivemind dashboard`'s to
        // print: logs travel further than the data directory's token file.
        tracing::info!(api = %api_addr, dashboard = %format!("http://{api_addr}/"), transport = %transport_addr, data_dir = %data_dir.display(), roles_dir = %config.roles_dir.display(), "hivemind is up");
        Ok(Daemon {
            api_addr,
            transport_addr,
            data_dir,
            token,
            manager,
            quorum: log,
            membership,
            registry,
            store: store_handle,
            shutdown,
            tasks,
        })
    }

    async fn shut_down(self) {
        let Daemon {
            manager,
            quorum,
            membership,
            store,
            shutdown,
            tasks,
            ..
        } = self;
        if quorum.member_addresses().0.len() > 1 {
            membership.mark_leaving();
            let generation = membership.view().me.as_ref().map_or(0, |id| id.generation);
            if let Err(error) = quorum
                .record_health(
                    quorum.id(),
                    NodeHealth::Left,
                    generation,
                    "shut down".into(),
                    GOODBYE_TIMEOUT,
                )
                .await
            {
                tracing::warn!(%error, "could not record this node's leaving; the others will find it failed");
            }
            membership.leave().await;
        }
        shutdown.cancel();
        for task in tasks {
            let _ = task.await;
        }
        manager.stop().await;
        quorum.shutdown().await;
        drop((manager, quorum));
        if !store.wait_last_handle(Duration::from_secs(5)).await {
            tracing::warn!("the store is still in use 5 s after shutdown; a restart may find it locked");
        }
        tracing::info!("hivemind stopped");
    }
}

/// Starts gossip on UDP at the transport's bound address, announcing the
/// transport's advertised address, under a generation past every earlier
/// start of this node.
async fn start_gossip(
    config: &HostConfig,
    store: &Store,
    transport_bound: SocketAddr,
    address: &NodeAddress,
    node: crate::quorum::NodeId,
    sealer: Sealer,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Membership, JoinHandle<()>)> {
    let previous = store
        .setting(GENERATION_SETTING)?
        .and_then(|text| text.parse::<u64>().ok());
    let now_ms = crate::quorum::now_ms();
    let generation = membership::identity::next_generation(previous, now_ms);
    store.set_setting(GENERATION_SETTING, Some(&generation.to_string()))?;
    let advertise = membership::gossip_address(&address.transport)
        .await
        .with_context(|| format!("cannot resolve the advertised address {} for gossip", address.transport))?;
    let metadata = NodeMetadata {
        node,
        generation,
        version: 0,
        name: address.name.clone(),
        api: address.api.clone(),
        transport: address.transport.clone(),
        roles: Vec::new(),
        epoch: 0,
    };
    Membership::start(
        GossipSetup {
            bind: transport_bound,
            advertise,
            generation,
            metadata,
            sealer,
            preset: config.gossip.preset,
            isolation: Isolation::default(),
        },
        shutdown.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "gossip shares the transport's port over UDP: free UDP port {} or pick another --transport",
            transport_bound.port()
        )
    })
}

/// The trimmed contents of `path`, or `bytes` random bytes in hex written
/// there (readable only by the owner) when the file is missing or empty.
fn read_or_create_random(path: &Path, bytes: usize, what: &str) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let value = text.trim().to_string();
        if !value.is_empty() {
            return Ok(value);
        }
    }
    let random: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    let value = hex::encode(random);
    write_file(path, value.as_bytes(), Access::Private).with_context(|| format!("cannot keep the {what}"))?;
    Ok(value)
}

/// On the first start only, writes the roles bundled in the binary (and their
/// manifests) into the roles directory. A manifest already there is kept: an
/// operator may prepare one (another DNS port, say) before the first start.
fn install_bundled_roles(data_dir: &Path, roles_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(BUNDLED_MARKER);
    if marker.exists() {
        return Ok(());
    }
    for (name, wasm, manifest) in hivemind_role_artifacts::BUNDLED {
        let manifest_path = roles_dir.join(format!("{name}.toml"));
        if let Some(manifest) = manifest
            && !manifest_path.exists()
        {
            write_file(&manifest_path, manifest.as_bytes(), Access::Shared)?;
        }
        write_file(&roles_dir.join(format!("{name}.wasm")), wasm, Access::Shared)?;
        tracing::info!(role = name, "installed bundled role");
    }
    write_file(&marker, b"", Access::Shared)?;
    Ok(())
}
