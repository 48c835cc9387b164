//! Health probes the host runs: a TCP connect or an HTTP GET, each bounded
//! by a timeout. Used by roles (through the `check` import) and bridges.

use std::fmt;
use std::time::Duration;

use hivemind_core::limits;

/// Largest HTTP body a probe reads (for a JSON field check).
const MAX_BODY: u64 = 64 << 10;

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The target did not answer as it should: news about the target.
    Target(String),
    /// This node could not run the probe (out of descriptors, memory or
    /// local ports): it says nothing about the target, and must not be
    /// reported as a fact about it.
    ThisNode(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Target(reason) => formatter.write_str(reason),
            ProbeFailure::ThisNode(reason) => write!(formatter, "cannot check from this node: {reason}"),
        }
    }
}

/// Opens (and closes) a TCP connection to `address` (`HOST:PORT`).
pub async fn tcp(address: &str, timeout: Duration) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Err(_) => Err(ProbeFailure::Target(format!(
            "no TCP connection to {address} within {} ms",
            timeout.as_millis()
        ))),
        Ok(Err(error)) if limits::is_local_shortage(&error) => {
            Err(ProbeFailure::ThisNode(format!("TCP {address}: {error}")))
        }
        Ok(Err(error)) => Err(ProbeFailure::Target(format!("TCP {address}: {error}"))),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `GET url`; a 2xx answer is `Ok` with its body (up to 64 KiB), anything
/// else an error that says what came back.
pub async fn http_get(url: &str, timeout: Duration) -> Result<Vec<u8>, ProbeFailure> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let url = url.to_string();
    tokio::task::spawn_blocking(move || match agent.get(&url).call() {
        Ok(mut response) if response.status().is_success() => response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|error| failure_of(format!("GET {url}: reading the body: {error}"), &error)),
        Ok(response) => Err(ProbeFailure::Target(format!(
            "GET {url} answered {}",
            response.status()
        ))),
        Err(error) => Err(failure_of(format!("GET {url}: {error}"), &error)),
    })
    .await
    .map_err(|error| ProbeFailure::ThisNode(error.to_string()))
    .and_then(|result| result)
}

fn failure_of(reason: String, error: &ureq::Error) -> ProbeFailure {
    let shortage = match error {
        ureq::Error::Io(error) => limits::is_local_shortage(error),
        other => limits::local_shortage(other).is_some(),
    };
    if shortage {
        ProbeFailure::ThisNode(reason)
    } else {
        ProbeFailure::Target(reason)
    }
}

/// Whether `body` is JSON whose `field` (a top-level name, or a JSON
/// pointer such as `/status/role`) equals `expected`.
pub fn json_field_matches(body: &[u8], field: &str, expected: &serde_json::Value) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("the body is not JSON ({error})"))?;
    let found = if field.starts_with('/') {
        value.pointer(field)
    } else {
        value.get(field)
    };
    match found {
        Some(found) if found == expected => Ok(()),
        Some(found) => Err(format!("{field} is {found}, not {expected}")),
        None => Err(format!("the body has no field {field}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Top-level names and pointers both work; a mismatch says what was found.
    #[test]
    fn json_fields() {
        let body = br#"{"role": "primary", "status": {"ok": true}}"#;
        assert!(json_field_matches(body, "role", &json!("primary")).is_ok());
        assert!(json_field_matches(body, "/status/ok", &json!(true)).is_ok());
        let error = json_field_matches(body, "role", &json!("replica")).unwrap_err();
        assert!(error.contains("\"primary\""), "{error}");
        assert!(json_field_matches(b"<html>", "role", &json!(true)).is_err());
        assert!(json_field_matches(body, "missing", &json!(true)).is_err());
    }
}
