//! Prometheus metrics: per-operation counts, errors by code, and latency
//! histograms, served as text on a small HTTP endpoint.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: String,
    code: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~52 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 21))
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<OpLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cairn_agent");
        let requests = Family::<OpLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register("requests", "RPCs handled, by operation", requests.clone());
        registry.register(
            "errors",
            "RPCs that failed, by operation and error code",
            errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "RPC latency, by operation",
            latency.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            latency,
        }
    }

    /// Record one finished RPC.
    pub fn observe(&self, op: &str, took: Duration, error_code: Option<&str>) {
        let l = OpLabels { op: op.to_string() };
        self.requests.get_or_create(&l).inc();
        self.latency.get_or_create(&l).observe(took.as_secs_f64());
        if let Some(code) = error_code {
            self.errors
                .get_or_create(&ErrorLabels {
                    op: op.to_string(),
                    code: code.to_string(),
                })
                .inc();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded).
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let line = head.lines().next().unwrap_or("");
            let (status, body) = if line.starts_with("GET /metrics ") {
                ("200 OK", m.render())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_latency_render() {
        let m = Metrics::new();
        m.observe("create_volume", Duration::from_millis(2), None);
        m.observe("create_volume", Duration::from_millis(3), Some("not_found"));
        let s = m.render();
        assert!(
            s.contains("cairn_agent_requests_total{op=\"create_volume\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("cairn_agent_errors_total{op=\"create_volume\",code=\"not_found\"} 1"),
            "{s}"
        );
        assert!(
            s.contains("cairn_agent_request_duration_seconds_count{op=\"create_volume\"} 2"),
            "{s}"
        );
    }
}
