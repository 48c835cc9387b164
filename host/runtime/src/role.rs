//! A loaded version of a role: its disposable instances (workers), the bound
//! on concurrent and queued calls, and what happens when an instance traps.
//!
//! Each call takes a free worker (or instantiates one), runs with the role's
//! CPU budget, and puts the worker back if the call returned. A trapped worker
//! is dropped, never reused. Traps in a row delay new instances with growing
//! backoff, and past `max_consecutive_traps` the role is failed: calls are
//! refused until a new version is loaded.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use wasmtime::{Engine, Store, UpdateDeadline};

use crate::bindings::{Description, Event, InstanceState, Request, Response, Role, RolePre};
use crate::engine::EpochClock;
use crate::error::{self, CallError, LoadError};
use crate::host::{CallOutcome, Export, FailureKind, RoleFailure, RoleHost};
use crate::limits::RoleLimits;

/// First pause before a new instance after a trap; doubles per trap in a row.
const TRAP_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest pause before a new instance after traps.
const TRAP_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Most leading bytes a kept reply may take from each datagram
/// (`keep-reply`'s `skip`): room for an ID, not for a different question.
pub const MAX_KEEP_SKIP: usize = 16;

/// A role's leave to reuse the reply of an `on-packet` call for later
/// datagrams with the same bytes after `skip` (the `keep-reply` import).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepReply {
    /// Leading bytes the host copies from each datagram into the reply.
    pub skip: usize,
    /// A counter (name, labels) each reuse adds one to, checked as `count`
    /// checks its arguments.
    pub tally: Option<(String, Vec<(String, String)>)>,
}

/// What an `on-packet` call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketReply {
    /// Bytes to send back, if any.
    pub reply: Option<Vec<u8>>,
    /// Set when the role allowed the reply to answer repeats of the datagram.
    pub keep: Option<KeepReply>,
}

/// One instance and its store.
struct Worker {
    store: Store<InstanceState>,
    role: Role,
}

/// Counters of a loaded role, for status output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleStats {
    pub calls: u64,
    pub traps: u64,
    pub overloads: u64,
    /// Instances retired after a call because they held most of their
    /// memory limit.
    pub recycled: u64,
    /// Datagrams the host answered from the role's kept replies, without
    /// a call (not in `calls`).
    pub kept_replies: u64,
    pub consecutive_traps: u32,
    /// Set once the role is failed.
    pub failed: Option<String>,
    pub busy_workers: u32,
    pub queued: u32,
}

struct TrapState {
    consecutive: u32,
    backoff_until: Option<Instant>,
    failed: Option<String>,
    last: String,
}

/// A version of a role that compiled, described itself and passed `init`.
pub struct LoadedRole {
    name: String,
    engine: Engine,
    epoch: Arc<EpochClock>,
    pre: RolePre<InstanceState>,
    description: Description,
    digest: String,
    limits: RoleLimits,
    host: Arc<dyn RoleHost>,
    permits: Semaphore,
    queued: AtomicU32,
    idle: Mutex<Vec<Worker>>,
    traps: Mutex<TrapState>,
    calls: AtomicU64,
    trap_count: AtomicU64,
    overloads: AtomicU64,
    recycled: AtomicU64,
    kept_replies_sent: AtomicU64,
    /// Bumped whenever replies kept through `keep-reply` may no longer be
    /// what the role would answer (see [`LoadedRole::kept_replies_generation`]).
    kept_generation: AtomicU64,
}

/// Decrements the queue length when a waiting call leaves, even if its future
/// is dropped while waiting.
struct QueueSlot<'a>(&'a AtomicU32);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The export a call goes to.
enum Call<'a> {
    Event(&'a Event),
    Request(&'a Request),
    Packet {
        listener: &'a str,
        peer: &'a str,
        data: &'a [u8],
    },
    Tick,
}

impl Call<'_> {
    fn export(&self) -> Export {
        match self {
            Call::Event(_) => Export::Event,
            Call::Request(_) => Export::Request,
            Call::Packet { .. } => Export::Packet,
            Call::Tick => Export::Tick,
        }
    }
}

enum Output {
    Event(Result<(), String>),
    Response(Response),
    Packet(PacketReply),
    Tick,
}

impl LoadedRole {
    pub(crate) async fn start(
        name: &str,
        engine: &Engine,
        epoch: &Arc<EpochClock>,
        pre: RolePre<InstanceState>,
        digest: String,
        limits: RoleLimits,
        host: Arc<dyn RoleHost>,
    ) -> Result<LoadedRole, LoadError> {
        let mut worker = instantiate(engine, epoch, &pre, &limits, &host)
            .await
            .map_err(|error| LoadError::Link(format!("{error:#}")))?;
        let running = epoch.enter();

        worker
            .store
            .data_mut()
            .clock
            .start(limits.cpu_per_init, "limits.init_cpu_ms");
        worker.store.set_epoch_deadline(1);
        let description = worker
            .role
            .call_describe(&mut worker.store)
            .await
            .map_err(|error| LoadError::Describe(explain_trap(&worker.store, &error)))?;
        match worker.role.call_init(&mut worker.store).await {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(LoadError::InitFailed(message)),
            Err(error) => return Err(LoadError::InitTrapped(explain_trap(&worker.store, &error))),
        }
        drop(running);

        let workers = limits.workers.max(1);
        Ok(LoadedRole {
            name: name.to_string(),
            engine: engine.clone(),
            epoch: epoch.clone(),
            pre,
            description,
            digest,
            permits: Semaphore::new(workers as usize),
            queued: AtomicU32::new(0),
            idle: Mutex::new(vec![worker]),
            traps: Mutex::new(TrapState {
                consecutive: 0,
                backoff_until: None,
                failed: None,
                last: String::new(),
            }),
            calls: AtomicU64::new(0),
            trap_count: AtomicU64::new(0),
            overloads: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            kept_replies_sent: AtomicU64::new(0),
            kept_generation: AtomicU64::new(0),
            limits,
            host,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &Description {
        &self.description
    }

    /// Hex SHA-256 of the bytes this version was loaded from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn limits(&self) -> &RoleLimits {
        &self.limits
    }

    pub fn stats(&self) -> RoleStats {
        let traps = self.traps.lock().unwrap();
        let workers = self.limits.workers.max(1);
        RoleStats {
            calls: self.calls.load(Ordering::Relaxed),
            traps: self.trap_count.load(Ordering::Relaxed),
            overloads: self.overloads.load(Ordering::Relaxed),
            recycled: self.recycled.load(Ordering::Relaxed),
            kept_replies: self.kept_replies_sent.load(Ordering::Relaxed),
            consecutive_traps: traps.consecutive,
            failed: traps.failed.clone(),
            busy_workers: workers - self.permits.available_permits() as u32,
            queued: self.queued.load(Ordering::Relaxed),
        }
    }

    /// Whether the role subscribed to events of this kind.
    pub fn subscribes_to(&self, kind: &str) -> bool {
        self.description
            .subscribes
            .iter()
            .any(|prefix| kind.starts_with(prefix.as_str()))
    }

    /// Delivers a committed event. `Ok(Err(_))` is the role's own refusal.
    pub async fn on_event(&self, event: &Event) -> Result<Result<(), String>, CallError> {
        match self.invoke(Call::Event(event)).await? {
            Output::Event(result) => Ok(result),
            _ => unreachable!("on-event returns an event result"),
        }
    }

    /// Runs the role's request handler.
    pub async fn on_request(&self, request: &Request) -> Result<Response, CallError> {
        match self.invoke(Call::Request(request)).await? {
            Output::Response(response) => {
                let size = response.body.len() as u64;
                if size > self.limits.response_bytes {
                    return Err(CallError::ResponseTooLarge {
                        role: self.name.clone(),
                        size,
                        limit: self.limits.response_bytes,
                    });
                }
                Ok(response)
            }
            _ => unreachable!("on-request returns a response"),
        }
    }

    /// Hands a datagram to the role; `Some` bytes are the reply.
    pub async fn on_packet(&self, listener: &str, peer: &str, data: &[u8]) -> Result<PacketReply, CallError> {
        match self.invoke(Call::Packet { listener, peer, data }).await? {
            Output::Packet(reply) => Ok(reply),
            _ => unreachable!("on-packet returns an optional reply"),
        }
    }

    pub async fn on_tick(&self) -> Result<(), CallError> {
        self.invoke(Call::Tick).await.map(|_| ())
    }

    /// Whether the role failed (too many traps in a row) and serves nothing
    /// until a new version is loaded.
    pub fn is_failed(&self) -> bool {
        self.traps.lock().unwrap().failed.is_some()
    }

    /// Changes whenever replies the role kept (`keep-reply`) may have gone
    /// stale: after an event or a request (either may change what the role
    /// holds), after a call that asked for it (`forget-replies`), and when
    /// an instance traps, is retired or is added. A reply is reusable only
    /// while this stays what it was when the call that kept it started.
    pub fn kept_replies_generation(&self) -> u64 {
        self.kept_generation.load(Ordering::Acquire)
    }

    /// Records datagrams answered from the role's kept replies.
    pub fn kept_replies_sent(&self, count: u64) {
        self.kept_replies_sent.fetch_add(count, Ordering::Relaxed);
        self.host.kept_replies_sent(count);
    }

    /// Adds `delta` to one of the role's counters, as its `count` import
    /// does; `name` and `labels` must have passed [`crate::validate_counter`].
    pub fn count(&self, name: &str, labels: &[(String, String)], delta: u64) -> Result<(), crate::HostError> {
        self.host.count(name, labels, delta)
    }

    async fn invoke(&self, call: Call<'_>) -> Result<Output, CallError> {
        if let Some(error) = self.failed_error() {
            return Err(error);
        }
        let _permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = self.queued.fetch_add(1, Ordering::AcqRel);
                let slot = QueueSlot(&self.queued);
                if queued >= self.limits.queue {
                    drop(slot);
                    self.overloads.fetch_add(1, Ordering::Relaxed);
                    self.host
                        .observe_call(call.export(), CallOutcome::Overloaded, Duration::ZERO);
                    return Err(CallError::Overloaded {
                        role: self.name.clone(),
                        workers: self.limits.workers.max(1),
                        queued,
                    });
                }
                let permit = self.permits.acquire().await.expect("the semaphore is never closed");
                drop(slot);
                // The role may have failed while this call waited its turn:
                // the calls queued behind the one that failed it are refused
                // now, with the reason, rather than each run (and trap).
                if let Some(error) = self.failed_error() {
                    return Err(error);
                }
                permit
            }
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let export = call.export();
        let mut worker = match self.take_worker().await {
            Ok(worker) => worker,
            Err(error) => {
                // No instance to run the call in: as good as a trap at its start.
                self.host.observe_call(export, CallOutcome::Trapped, Duration::ZERO);
                return Err(error);
            }
        };
        let started = Instant::now();
        worker
            .store
            .data_mut()
            .clock
            .start(self.limits.cpu_per_call, "limits.cpu_ms");
        worker.store.data().stderr.clear_tail();
        let is_packet = matches!(call, Call::Packet { .. });
        let state = worker.store.data_mut();
        state.in_packet = is_packet;
        state.keep = None;
        state.forget_replies = false;
        worker.store.set_epoch_deadline(1);
        let running = self.epoch.enter();
        let result = match call {
            Call::Event(event) => worker
                .role
                .call_on_event(&mut worker.store, event)
                .await
                .map(Output::Event),
            Call::Request(request) => worker
                .role
                .call_on_request(&mut worker.store, request)
                .await
                .map(Output::Response),
            Call::Packet { listener, peer, data } => worker
                .role
                .call_on_packet(&mut worker.store, listener, peer, data)
                .await
                .map(|reply| {
                    Output::Packet(PacketReply {
                        reply,
                        keep: worker.store.data_mut().keep.take(),
                    })
                }),
            Call::Tick => worker.role.call_on_tick(&mut worker.store).await.map(|()| Output::Tick),
        };
        drop(running);
        let state = worker.store.data_mut();
        state.in_packet = false;
        // An event or a request may change what the role answers; a tick
        // or a packet says so with `forget-replies`.
        let forget = matches!(call, Call::Event(_) | Call::Request(_)) || std::mem::take(&mut state.forget_replies);
        if forget {
            self.forget_kept_replies();
        }
        let outcome = match &result {
            Ok(Output::Event(Err(_))) => CallOutcome::Error,
            Ok(Output::Response(response)) if response.status >= 500 => CallOutcome::Error,
            Ok(_) => CallOutcome::Ok,
            Err(_) => CallOutcome::Trapped,
        };
        self.host.observe_call(export, outcome, started.elapsed());
        match result {
            Ok(output) => {
                self.reset_traps();
                let memory = &worker.store.data().memory;
                // A heap that only grows (a collector that waits for
                // pressure, as JavaScript's does, or a leak) would one day
                // trap at the limit in the middle of a call. Past three
                // quarters of it the instance is retired now, between calls;
                // the next call gets a fresh one (state lives in `state`).
                if memory.in_use() > memory.limit / 4 * 3 {
                    self.recycled.fetch_add(1, Ordering::Relaxed);
                    self.forget_kept_replies();
                    return Ok(output);
                }
                let mut idle = self.idle.lock().unwrap();
                if idle.len() < self.limits.workers as usize {
                    idle.push(worker);
                }
                Ok(output)
            }
            Err(error) => {
                let reason = explain_trap(&worker.store, &error);
                drop(worker);
                self.forget_kept_replies();
                Err(self.record_trap(reason))
            }
        }
    }

    fn forget_kept_replies(&self) {
        self.kept_generation.fetch_add(1, Ordering::AcqRel);
    }

    fn failed_error(&self) -> Option<CallError> {
        let traps = self.traps.lock().unwrap();
        traps.failed.as_ref().map(|_| CallError::Failed {
            role: self.name.clone(),
            traps: traps.consecutive,
            last: traps.last.clone(),
        })
    }

    async fn take_worker(&self) -> Result<Worker, CallError> {
        if let Some(worker) = self.idle.lock().unwrap().pop() {
            return Ok(worker);
        }
        let backoff_until = self.traps.lock().unwrap().backoff_until;
        if let Some(until) = backoff_until {
            tokio::time::sleep_until(until.into()).await;
            if let Some(error) = self.failed_error() {
                return Err(error);
            }
        }
        // A new instance holds nothing the kept replies came from.
        self.forget_kept_replies();
        instantiate(&self.engine, &self.epoch, &self.pre, &self.limits, &self.host)
            .await
            .map_err(|error| CallError::Instantiate {
                role: self.name.clone(),
                reason: format!("{error:#}"),
            })
    }

    fn reset_traps(&self) {
        let mut traps = self.traps.lock().unwrap();
        if traps.consecutive > 0 {
            traps.consecutive = 0;
            traps.backoff_until = None;
        }
    }

    fn record_trap(&self, reason: String) -> CallError {
        self.trap_count.fetch_add(1, Ordering::Relaxed);
        let mut traps = self.traps.lock().unwrap();
        traps.consecutive += 1;
        traps.last = reason.clone();
        let consecutive = traps.consecutive;
        if consecutive >= self.limits.max_consecutive_traps && traps.failed.is_none() {
            traps.failed = Some(reason.clone());
            drop(traps);
            self.host.report(RoleFailure {
                role: self.name.clone(),
                kind: FailureKind::Failed,
                message: format!(
                    "role `{}` failed after {consecutive} traps in a row (last: {reason}); it no longer serves until it is reloaded",
                    self.name
                ),
            });
            return CallError::Failed {
                role: self.name.clone(),
                traps: consecutive,
                last: reason,
            };
        }
        let backoff = TRAP_BACKOFF_BASE
            .saturating_mul(1 << (consecutive - 1).min(16))
            .min(TRAP_BACKOFF_MAX);
        traps.backoff_until = Some(Instant::now() + backoff);
        drop(traps);
        self.host.report(RoleFailure {
            role: self.name.clone(),
            kind: FailureKind::Trapped,
            message: format!(
                "role `{}` trapped ({consecutive} in a row; next instance in {} ms): {reason}",
                self.name,
                backoff.as_millis()
            ),
        });
        CallError::Trapped {
            role: self.name.clone(),
            reason,
        }
    }
}

async fn instantiate(
    engine: &Engine,
    epoch: &EpochClock,
    pre: &RolePre<InstanceState>,
    limits: &RoleLimits,
    host: &Arc<dyn RoleHost>,
) -> wasmtime::Result<Worker> {
    let mut store = Store::new(engine, InstanceState::new(host.clone(), limits.memory_bytes));
    store.limiter(|state| &mut state.memory);
    store.epoch_deadline_callback(|mut context| {
        let clock = &mut context.data_mut().clock;
        if clock.over_budget() {
            clock.exceeded = true;
            return Err(wasmtime::Error::msg(clock.exceeded_message()));
        }
        // Yield so a busy role cannot hold a runtime thread for its whole budget.
        Ok(UpdateDeadline::Yield(1))
    });
    // Instantiation runs start functions; give them the init budget.
    store.data_mut().clock.start(limits.cpu_per_init, "limits.init_cpu_ms");
    store.set_epoch_deadline(1);
    let _running = epoch.enter();
    let role = pre.instantiate_async(&mut store).await?;
    Ok(Worker { store, role })
}

/// Explains a failed call in an operator's words: the CPU or memory limit if
/// one was hit, otherwise the trap and the role's own backtrace.
fn explain_trap(store: &Store<InstanceState>, error: &wasmtime::Error) -> String {
    let state = store.data();
    if state.clock.exceeded {
        return state.clock.exceeded_message();
    }
    if let Some(wanted) = state.memory.denied {
        return error::memory_exceeded(state.memory.limit, wanted);
    }
    let what = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    };
    // A Rust panic prints `panicked at FILE:LINE:COL:` and its message to
    // stderr just before the trap; show the last two meaningful lines.
    let tail = state.stderr.tail();
    let said: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    match said.len() {
        0 => what,
        n => format!("{what}; the role wrote: {}", said[n.saturating_sub(2)..].join(" ")),
    }
}
