//! Host-owned UDP listeners. The socket belongs to the role's slot, not to a
//! version, so reloading a role never unbinds its port: datagrams that arrive
//! during a reload are handled by whichever version is current.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::roles::manager::{RoleManager, RoleSlot};
use crate::roles::manifest::ListenerSpec;

/// Largest datagram read; anything bigger is truncated by the kernel anyway.
const MAX_DATAGRAM: usize = 65_535;

pub struct Listener {
    pub name: String,
    /// The address asked for in the manifest.
    pub address: SocketAddr,
    /// The address bound (differs when the manifest asked for port 0).
    pub local_addr: SocketAddr,
    socket: Arc<UdpSocket>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The sockets a version with `specs` needs: existing ones are reused, new
/// ones are bound now. Nothing is closed or started until [`commit`].
pub(crate) async fn prepare(
    slot: &RoleSlot,
    specs: &[ListenerSpec],
) -> Result<Vec<(String, SocketAddr, Arc<UdpSocket>)>, String> {
    let existing: Vec<(SocketAddr, Arc<UdpSocket>)> = RoleManager::slot_listeners(slot)
        .iter()
        .map(|listener| (listener.address, listener.socket.clone()))
        .collect();
    let mut prepared = Vec::new();
    for spec in specs {
        let socket = match existing.iter().find(|(address, _)| *address == spec.address) {
            Some((_, socket)) => socket.clone(),
            None => Arc::new(
                UdpSocket::bind(spec.address)
                    .await
                    .map_err(|error| format!("listener {:?}: cannot bind udp {}: {error}", spec.name, spec.address))?,
            ),
        };
        prepared.push((spec.name.clone(), spec.address, socket));
    }
    Ok(prepared)
}

/// Makes `prepared` the slot's listeners: sockets no longer wanted close,
/// each kept socket gets a receive task that dispatches to the slot.
pub(crate) fn commit(slot: &Arc<RoleSlot>, prepared: Vec<(String, SocketAddr, Arc<UdpSocket>)>) {
    let mut listeners = RoleManager::slot_listeners(slot);
    let mut next = Vec::with_capacity(prepared.len());
    for (name, address, socket) in prepared {
        let local_addr = socket.local_addr().unwrap_or(address);
        let task = slot.tracker.spawn(receive(slot.clone(), name.clone(), socket.clone()));
        next.push(Listener {
            name,
            address,
            local_addr,
            socket,
            task: Some(task),
        });
    }
    // Dropping the old entries aborts their tasks; sockets shared with the
    // new entries stay open through their other `Arc`.
    *listeners = next;
}

async fn receive(slot: Arc<RoleSlot>, name: String, socket: Arc<UdpSocket>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let name: Arc<str> = name.into();
    loop {
        let received = tokio::select! {
            _ = slot.shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (length, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!(role = %slot.name, listener = %name, %error, "udp receive error");
                continue;
            }
        };
        let Some(role) = slot.serving() else { continue };
        let data = buffer[..length].to_vec();
        let socket = socket.clone();
        let name = name.clone();
        slot.tracker.spawn(async move {
            match role.on_packet(&name, &peer.to_string(), &data).await {
                Ok(Some(reply)) => {
                    if let Err(error) = socket.send_to(&reply, peer).await {
                        tracing::debug!(role = role.name(), %peer, %error, "udp reply not sent");
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(role = role.name(), %peer, %error, "datagram dropped"),
            }
        });
    }
}
