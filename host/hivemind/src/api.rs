//! The HTTP API (`/v1/...`): status, role management, role installs, the
//! event log, and every role's own routes under `/v1/roles/NAME/...`; the
//! node's metrics at `/metrics`.
//!
//! Every route needs `Authorization: Bearer TOKEN` (the token is generated on
//! first start into `DATA_DIR/token`). Errors are JSON `{"error": "..."}` that
//! say what failed and what to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use hivemind_core::files::{Access, write_file};
use serde::Deserialize;
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::log::{EventLog, LogError, NewEvent};
use crate::notify::Notifier;
use crate::registry::Registry;
use crate::roles::manager::{RoleError, RoleManager, RoleState, valid_role_name};

/// Largest role file accepted by an install: Python and JavaScript
/// components are 12-20 MB; this leaves room without inviting abuse.
const MAX_ROLE_FILE_BYTES: usize = 256 << 20;
/// Largest request body passed to a role.
const MAX_ROLE_REQUEST_BYTES: usize = 8 << 20;
/// Largest event body: the payload limit plus room for kind, key and JSON.
const MAX_EVENT_BODY_BYTES: usize = crate::log::MAX_PAYLOAD_BYTES + (16 << 10);

/// Management verbs under `/v1/roles/NAME/VERB`; a role cannot use these
/// names for its own POST routes.
pub const ROLE_ACTIONS: [&str; 5] = ["enable", "disable", "pause", "resume", "reload"];

#[derive(Clone)]
pub struct ApiState {
    pub manager: Arc<RoleManager>,
    pub log: Arc<dyn EventLog>,
    pub quorum: Arc<crate::quorum::QuorumLog>,
    pub registry: Arc<Registry>,
    pub membership: crate::membership::Membership,
    pub connect: Arc<crate::connect::Connect>,
    pub notifier: Arc<Notifier>,
    pub bridges: Arc<crate::bridge::Bridges>,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    pub token: Arc<str>,
    pub started: Instant,
    /// Ends long-lived responses (event streams) when the host stops.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The API under `/v1` and `/metrics`, both behind the token, and the
/// dashboard's page and assets, which are public: the page asks for the
/// token and sends it with each of its API calls.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/roles", get(list_roles))
        .route("/v1/roles/{name}", get(role_info))
        .route(
            "/v1/roles/{name}/{*rest}",
            any(role_route).layer(DefaultBodyLimit::max(MAX_ROLE_REQUEST_BYTES)),
        )
        .route(
            "/v1/role-files/{file}",
            put(put_role_file)
                .delete(delete_role_file)
                .layer(DefaultBodyLimit::max(MAX_ROLE_FILE_BYTES)),
        )
        .route(
            "/v1/events",
            post(emit_event)
                .layer(DefaultBodyLimit::max(MAX_EVENT_BODY_BYTES))
                .get(list_events),
        )
        .route("/v1/events/stream", get(stream_events))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/cluster/members", get(list_members))
        .route("/v1/cluster/members/{node}/{action}", post(change_member))
        .route("/v1/cluster/tokens", post(issue_token))
        .route("/v1/bridges", get(list_bridges))
        .route("/v1/bridges/{name}", get(bridge_status).patch(act_on_bridge))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    crate::dashboard::router()
        .merge(v1)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The 413 for a body over `limit` bytes, naming the limit.
fn too_large(what: &str, limit: usize) -> ApiError {
    ApiError::new(
        413,
        format!(
            "{what} may be at most {limit} bytes ({} KiB); this request's body is larger",
            limit >> 10
        ),
    )
}

/// A JSON error response.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<crate::bridge::ActionError> for ApiError {
    fn from(error: crate::bridge::ActionError) -> Self {
        ApiError::new(error.status, error.message)
    }
}

impl From<RoleError> for ApiError {
    fn from(error: RoleError) -> Self {
        ApiError::new(error.http_status(), error.to_string())
    }
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match presented {
        None => ApiError::new(
            401,
            "missing bearer token: pass --token or set HIVEMIND_TOKEN (the token is in the host's DATA_DIR/token)",
        )
        .into_response(),
        Some(token) if !constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            ApiError::new(401, "wrong token: use the one in the host's DATA_DIR/token").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// The token of an `Authorization` value: the scheme is case-insensitive
/// (RFC 9110 §11.1), so `bearer` and `BEARER` are as good as `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(404, format!("no such API route: {method} {}", uri.path()))
}

/// `GET /metrics`: the node's series in the OpenMetrics text format.
async fn metrics(State(state): State<ApiState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let quorum = state.quorum.status().await;
    let view = state.membership.view();
    let members = |liveness| view.count(liveness) as u64;
    let snapshot = crate::metrics::Snapshot {
        roles: state
            .manager
            .list()
            .into_iter()
            .map(|role| crate::metrics::RoleGauges {
                state: role.state.as_str(),
                version: role.version.unwrap_or_default(),
                queued: role.stats.as_ref().map_or(0, |stats| stats.queued),
                busy_workers: role.stats.as_ref().map_or(0, |stats| stats.busy_workers),
                workers: role.stats.as_ref().map_or(0, |stats| stats.workers),
                name: role.name,
            })
            .collect(),
        log: state.quorum.gauges(),
        epoch: quorum.epoch,
        degraded: quorum.problem.is_some(),
        members: [
            ("alive", members(crate::membership::Liveness::Alive)),
            ("suspect", members(crate::membership::Liveness::Suspect)),
            ("down", members(crate::membership::Liveness::Down)),
        ],
        gossip: view.counters,
        bridges: state.bridges.gauges(),
        connect_links: state.connect.open_links() as u64,
        connect_calls: state.connect.counters.calls.load(Relaxed),
        connect_failed: state.connect.counters.failed.load(Relaxed),
        last_seq: *state.log.watch_last().borrow(),
    };
    let text = state.metrics.render(snapshot);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn status(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let roles = state.manager.list();
    let count = |wanted: RoleState| roles.iter().filter(|role| role.state == wanted).count();
    let node = state.registry.self_node();
    let log_gauges = state.quorum.gauges();
    Json(json!({
        "node": { "id": node.id, "name": node.name, "address": node.api },
        "cluster": cluster_status(&state).await,
        "version": env!("CARGO_PKG_VERSION"),
        "contract": hivemind_runtime::CONTRACT,
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        "allocator": format!("{:?}", state.manager.runtime().allocator()),
        "roles": {
            "total": roles.len(),
            "running": count(RoleState::Running),
            "loading": count(RoleState::Loading),
            "paused": count(RoleState::Paused),
            "disabled": count(RoleState::Disabled),
            "failed": count(RoleState::Failed),
        },
        "last_seq": *state.log.watch_last().borrow(),
        "log": {
            "term": log_gauges.term,
            "last_index": log_gauges.last_index,
            "commit_index": log_gauges.committed,
            "applied_index": log_gauges.applied,
            "writes": state.quorum.writes.count.load(std::sync::atomic::Ordering::Relaxed),
            "write_seconds_sum": state.quorum.writes.total_micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6,
        },
        "gossip": gossip_status(&state),
        "connect": {
            "open_links": state.connect.open_links(),
            "opened": state.connect.counters.opened.load(std::sync::atomic::Ordering::Relaxed),
            "closed": state.connect.counters.closed.load(std::sync::atomic::Ordering::Relaxed),
            "calls": state.connect.counters.calls.load(std::sync::atomic::Ordering::Relaxed),
            "failed": state.connect.counters.failed.load(std::sync::atomic::Ordering::Relaxed),
        },
        "recent_failures": state.notifier.recent(),
    }))
}

fn gossip_status(state: &ApiState) -> serde_json::Value {
    let view = state.membership.view();
    let count = |liveness| view.count(liveness);
    json!({
        "address": state.membership.local_addr.to_string(),
        "generation": view.me.as_ref().map(|me| me.generation),
        "alive": count(crate::membership::Liveness::Alive),
        "suspect": count(crate::membership::Liveness::Suspect),
        "down": count(crate::membership::Liveness::Down),
        "packets_sent": view.counters.sent,
        "packets_received": view.counters.received,
        "packets_rejected": view.counters.rejected,
        "packets_refused": view.counters.refused,
    })
}

async fn cluster_status(state: &ApiState) -> serde_json::Value {
    let quorum = state.quorum.status().await;
    let mode = if quorum.members.len() == 1 {
        "single-node"
    } else {
        "cluster"
    };
    let mut status = serde_json::to_value(&quorum).unwrap_or_default();
    status["mode"] = json!(mode);
    status
}

async fn list_members(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!(state.quorum.status().await.members))
}

/// `POST /v1/cluster/members/{node}/{promote|demote|remove}`; `node` is a
/// node id (hex) or a member's name.
async fn change_member(
    State(state): State<ApiState>,
    Path((node, action)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::quorum::MemberChange;
    let members = state.quorum.status().await.members;
    let matches: Vec<_> = members
        .iter()
        .filter(|member| member.id == node || member.name == node)
        .collect();
    let member = match matches.as_slice() {
        [member] => member,
        [] => {
            return Err(ApiError::new(
                404,
                format!("no member {node:?}: `hivemind members` lists them by id and name"),
            ));
        }
        _ => {
            return Err(ApiError::new(
                409,
                format!("{} members are named {node:?}; give the node id instead", matches.len()),
            ));
        }
    };
    let id = u64::from_str_radix(&member.id, 16).map_err(|_| ApiError::new(500, "bad member id"))?;
    let change = match action.as_str() {
        "promote" => MemberChange::Promote(id),
        "demote" => MemberChange::Demote(id),
        "remove" => MemberChange::Remove(id),
        other => {
            return Err(ApiError::new(
                404,
                format!("no member action {other:?}: use promote, demote or remove"),
            ));
        }
    };
    match state.quorum.change_member(change).await {
        Ok(message) => Ok(Json(
            json!({ "node": member.id, "name": member.name, "message": message }),
        )),
        Err(LogError::Invalid(message)) => Err(ApiError::new(409, message)),
        Err(error) => Err(ApiError::new(503, error.to_string())),
    }
}

#[derive(Deserialize, Default)]
struct TokenBody {
    /// Seconds the token stays valid; default one hour.
    ttl_secs: Option<u64>,
}

/// `POST /v1/cluster/tokens`: a single-use join token.
async fn issue_token(
    State(state): State<ApiState>,
    body: Option<Json<TokenBody>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ttl = body.and_then(|Json(body)| body.ttl_secs).unwrap_or(3600);
    if ttl == 0 || ttl > 7 * 24 * 3600 {
        return Err(ApiError::new(400, "ttl_secs must be between 1 and 604800 (a week)"));
    }
    match state.quorum.issue_token(std::time::Duration::from_secs(ttl)).await {
        Ok((token, expires_ms)) => Ok(Json(json!({ "token": token, "expires_ms": expires_ms }))),
        Err(error) => Err(ApiError::new(503, error.to_string())),
    }
}

async fn list_roles(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!(state.manager.list()))
}

async fn role_info(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .manager
        .info(&name)
        .map(|info| Json(json!(info)))
        .ok_or_else(|| RoleError::NoSuchRole(name).into())
}

async fn role_route(
    State(state): State<ApiState>,
    Path((name, rest)): Path<(String, String)>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|error| match error.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large("a request to a role", MAX_ROLE_REQUEST_BYTES),
        status => ApiError::new(status.as_u16(), format!("cannot read the request: {error}")),
    })?;
    if method == Method::POST && ROLE_ACTIONS.contains(&rest.as_str()) {
        let manager = &state.manager;
        match rest.as_str() {
            "enable" => manager.enable(&name).await?,
            "disable" => manager.disable(&name).await?,
            "pause" => manager.set_paused(&name, true).await?,
            "resume" => manager.set_paused(&name, false).await?,
            _ => manager.reload(&name).await?,
        }
        let info = manager.info(&name).ok_or_else(|| RoleError::NoSuchRole(name.clone()))?;
        return Ok(Json(json!(info)).into_response());
    }
    let request = hivemind_runtime::Request {
        method: method.to_string(),
        path: format!("/{rest}"),
        query: uri.query().unwrap_or("").to_string(),
        headers: headers
            .iter()
            .filter(|(name, _)| *name != header::AUTHORIZATION)
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
    };
    let response = state.manager.request(&name, request).await?;
    let status = StatusCode::from_u16(response.status).map_err(|_| {
        ApiError::new(
            502,
            format!("role `{name}` answered with invalid HTTP status {}", response.status),
        )
    })?;
    let mut reply = Response::builder().status(status);
    for (key, value) in &response.headers {
        if let (Ok(key), Ok(value)) = (
            HeaderName::try_from(key.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            reply = reply.header(key, value);
        }
    }
    reply
        .body(Body::from(response.body))
        .map_err(|error| ApiError::new(502, error.to_string()))
}

/// `NAME.wasm` or `NAME.toml` written into the roles directory the one
/// safe way (`hivemind_core::files`: a temporary file of its own, fsync,
/// rename), then picked up like any dropped file. A link or directory under
/// that name is refused (409), never written through.
async fn put_role_file(
    State(state): State<ApiState>,
    Path(file): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(|error| match error.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large("a role file", MAX_ROLE_FILE_BYTES),
        status => ApiError::new(status.as_u16(), format!("cannot read the upload: {error}")),
    })?;
    let (name, extension) = split_role_file(&file)?;
    let dir = state.manager.roles_dir().to_path_buf();
    let target = dir.join(&file);
    let bytes = body.clone();
    let written = tokio::task::spawn_blocking(move || write_file(&target, &bytes, Access::Shared))
        .await
        .map_err(|_| ApiError::new(503, "the host is shutting down"))?;
    if let Err(error) = written {
        let status = if error.kind() == std::io::ErrorKind::InvalidInput {
            409
        } else {
            500
        };
        return Err(ApiError::new(status, error.to_string()));
    }
    state.manager.sync().await;
    Ok(Json(
        json!({ "role": name, "file": file, "kind": extension, "bytes": body.len() }),
    ))
}

/// Removes a role's files, which unloads it.
async fn delete_role_file(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !valid_role_name(&name) {
        return Err(ApiError::new(400, format!("{name:?} is not a role name")));
    }
    let dir = state.manager.roles_dir().to_path_buf();
    let wasm = dir.join(format!("{name}.wasm"));
    match tokio::fs::remove_file(&wasm).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(RoleError::NoSuchRole(name).into()),
        Err(error) => return Err(ApiError::new(500, format!("cannot remove {}: {error}", wasm.display()))),
    }
    let _ = tokio::fs::remove_file(dir.join(format!("{name}.toml"))).await;
    state.manager.sync().await;
    Ok(Json(json!({ "removed": name })))
}

fn split_role_file(file: &str) -> Result<(&str, &str), ApiError> {
    let (name, extension) = file
        .rsplit_once('.')
        .filter(|(_, extension)| *extension == "wasm" || *extension == "toml")
        .ok_or_else(|| ApiError::new(400, format!("{file:?}: role files are NAME.wasm or NAME.toml")))?;
    if !valid_role_name(name) {
        return Err(ApiError::new(
            400,
            format!("{name:?} is not a role name: use lowercase letters, digits, '-' and '_'"),
        ));
    }
    Ok((name, extension))
}

#[derive(Deserialize)]
struct EmitBody {
    kind: String,
    key: String,
    #[serde(default)]
    payload: serde_json::Value,
}

async fn emit_event(
    State(state): State<ApiState>,
    body: Result<Json<EmitBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body.map_err(|error| match error.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large("an event", MAX_EVENT_BODY_BYTES),
        _ => ApiError::new(
            400,
            format!("event body must be JSON {{\"kind\", \"key\", \"payload\"}}: {error}"),
        ),
    })?;
    // Bridges route by these; only the bridges and their operator
    // actions (which check names and require a reason) write them.
    if body.kind.starts_with(crate::bridge::ledger::PREFIX) {
        return Err(ApiError::new(
            400,
            format!(
                "kind {:?}: bridge.* events are written by the bridges; use PATCH /v1/bridges/NAME (or `hivemind \
                 bridge ...`) to act on a bridge",
                body.kind
            ),
        ));
    }
    let payload = if body.payload.is_null() {
        b"{}".to_vec()
    } else {
        serde_json::to_vec(&body.payload).unwrap_or_default()
    };
    let event = NewEvent {
        kind: body.kind,
        key: body.key,
        source: state.registry.self_id(),
        payload,
    };
    match state.log.append(event).await {
        Ok(seq) => Ok(Json(json!({ "seq": seq }))),
        Err(LogError::Invalid(message)) => Err(ApiError::new(400, message)),
        Err(error @ LogError::Unavailable(_)) => Err(ApiError::new(503, error.to_string())),
        Err(error) => Err(ApiError::new(500, error.to_string())),
    }
}

/// Longest a `/v1/nodes` long-poll may wait.
const MAX_NODES_WAIT: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodesQuery {
    role: Option<String>,
    #[serde(default)]
    healthy: bool,
    /// Answer once `last_changed` passes this (a long-poll).
    wait_change_since: Option<u64>,
    /// Answer once the table has not changed for this long.
    wait_stable_ms: Option<u64>,
    /// How long either wait may take; 30 s by default.
    timeout_ms: Option<u64>,
    /// `text` for the registry's human dump instead of JSON.
    format: Option<String>,
}

/// `GET /v1/nodes`: the registry, the node × role table.
async fn list_nodes(
    State(state): State<ApiState>,
    query: Result<Query<NodesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(query) = query.map_err(|error| {
        ApiError::new(
            400,
            format!("query: {error} (use ?role=NAME&healthy=true&wait_change_since=N&wait_stable_ms=MS&timeout_ms=MS)"),
        )
    })?;
    let timeout = query
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30))
        .min(MAX_NODES_WAIT);
    if let Some(since) = query.wait_change_since {
        state.registry.wait_for_change(since, timeout).await;
    }
    let stable = match query.wait_stable_ms {
        Some(quiet) => Some(
            state
                .registry
                .wait_for_stable(Duration::from_millis(quiet), timeout)
                .await,
        ),
        None => None,
    };
    match query.format.as_deref() {
        None | Some("json") => Ok(Json(json!({
            "last_changed": state.registry.last_changed(),
            "stable": stable,
            "nodes": state.registry.nodes(query.role.as_deref(), query.healthy),
        }))
        .into_response()),
        Some("text") => Ok(state.registry.dump().into_response()),
        Some(other) => Err(ApiError::new(
            400,
            format!("format={other} is not one of `json`, `text`"),
        )),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    kind: String,
    limit: Option<usize>,
}

async fn list_events(
    State(state): State<ApiState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) =
        query.map_err(|error| ApiError::new(400, format!("query: {error} (use ?since=SEQ&kind=PREFIX&limit=N)")))?;
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    let events = state
        .log
        .since(query.since, &query.kind, limit)
        .await
        .map_err(|error| match error {
            LogError::Unavailable(_) => ApiError::new(503, error.to_string()),
            other => ApiError::new(500, other.to_string()),
        })?;
    Ok(Json(json!(events)))
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    kind: String,
}

/// Committed events after `since` (kind prefix `kind`) as server-sent
/// events, then new ones as they commit, until the client or the host goes.
async fn stream_events(
    State(state): State<ApiState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<
    axum::response::sse::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Query(query) =
        query.map_err(|error| ApiError::new(400, format!("query: {error} (use ?since=SEQ&kind=PREFIX)")))?;
    struct Cursor {
        log: Arc<dyn EventLog>,
        newest: tokio::sync::watch::Receiver<u64>,
        after: u64,
        kind: String,
        pending: std::collections::VecDeque<crate::log::StoredEvent>,
        shutdown: tokio_util::sync::CancellationToken,
    }
    let start = Cursor {
        newest: state.log.watch_last(),
        log: state.log.clone(),
        after: query.since,
        kind: query.kind,
        pending: Default::default(),
        shutdown: state.shutdown.clone(),
    };
    let stream = futures::stream::unfold(start, |mut cursor| async move {
        loop {
            if let Some(event) = cursor.pending.pop_front() {
                cursor.after = event.seq;
                let data = serde_json::to_string(&event).unwrap_or_default();
                let item = Event::default()
                    .id(event.seq.to_string())
                    .event(event.kind.clone())
                    .data(data);
                return Some((Ok(item), cursor));
            }
            cursor.newest.borrow_and_update();
            match cursor.log.since(cursor.after, &cursor.kind, 256).await {
                Ok(batch) if !batch.is_empty() => cursor.pending.extend(batch),
                Ok(_) => tokio::select! {
                    _ = cursor.shutdown.cancelled() => return None,
                    changed = cursor.newest.changed() => if changed.is_err() { return None },
                },
                Err(error) => {
                    tracing::warn!(%error, "event stream ended: cannot read the log");
                    return None;
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn list_bridges(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(serde_json::Value::Array(state.bridges.list().await))
}

async fn bridge_status(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.bridges.status(&name).await.map(Json).map_err(ApiError::from)
}

async fn act_on_bridge(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<crate::bridge::Action>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(action) = body.map_err(|error| {
        ApiError::new(
            400,
            format!(
                "body must be JSON with one of \"enabled\", \"pin\", \"drain\", \"undrain\" and a \"reason\": {error}"
            ),
        )
    })?;
    state.bridges.act(&name, action).await.map(Json).map_err(ApiError::from)
}
