//! Remembered outcomes of mutating requests: a retry with the same
//! request id gets the first answer, the same id with another request is
//! refused, and a caller can ask what became of a request id.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use cairn_domain::api::RequestState;
use cairn_proto::fingerprint;

use crate::error::AgentError;

/// Remembered outcomes of mutating requests, by request id: one id names
/// one request, whatever its method.
#[derive(Default)]
pub struct RequestLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    map: HashMap<String, Arc<tokio::sync::Mutex<Option<Remembered>>>>,
    order: VecDeque<String>,
}

pub(crate) struct Remembered {
    /// Of the method and the request's bytes.
    pub(crate) fingerprint: u64,
    /// The answer; `None` when the request failed (a retry runs again).
    pub(crate) response: Option<Vec<u8>>,
}

/// How many outcomes are remembered.
const REQUEST_LOG_SIZE: usize = 20_000;

impl RequestLog {
    pub(crate) fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Option<Remembered>>> {
        let mut g = self.inner.lock().expect("poisoned");
        let key = id.to_string();
        if let Some(s) = g.map.get(&key) {
            return s.clone();
        }
        let s = Arc::new(tokio::sync::Mutex::new(None));
        g.map.insert(key.clone(), s.clone());
        g.order.push_back(key);
        while g.order.len() > REQUEST_LOG_SIZE {
            if let Some(old) = g.order.pop_front() {
                g.map.remove(&old);
            }
        }
        s
    }

    /// What is known of request id `id`.
    pub(crate) fn state(&self, id: &str) -> RequestState {
        let g = self.inner.lock().expect("poisoned");
        let Some(slot) = g.map.get(id).cloned() else {
            return RequestState::Unknown;
        };
        drop(g);
        let state = match slot.try_lock() {
            Err(_) => RequestState::Running,
            Ok(r) if r.as_ref().is_some_and(|r| r.response.is_some()) => RequestState::Answered,
            Ok(_) => RequestState::Failed,
        };
        state
    }
}

/// A request id as the domain journal records it: a UUID's bytes, or a
/// hash of any other string.
pub(crate) fn request_bytes(id: &str) -> [u8; 16] {
    if let Ok(u) = uuid::Uuid::parse_str(id) {
        return *u.as_bytes();
    }
    let a = fingerprint(id.as_bytes());
    let b = fingerprint(&[id.as_bytes(), b"#"].concat());
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

pub(crate) fn check_request_id(id: &str) -> Result<(), AgentError> {
    Ok(cairn_domain::limits::check_request_id(id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_map_to_stable_bytes() {
        let u = "6f1c1a52-4b8e-4a43-9d2c-0a2b3c4d5e6f";
        assert_eq!(
            request_bytes(u),
            *uuid::Uuid::parse_str(u).unwrap().as_bytes()
        );
        assert_eq!(request_bytes("retry-1"), request_bytes("retry-1"));
        assert_ne!(request_bytes("retry-1"), request_bytes("retry-2"));
        assert!(check_request_id(&"x".repeat(65)).is_err());
        assert!(check_request_id("a\nb").is_err());
    }
}
