//! A stock Python grpcio client (`tests/py/stock_client.py`, in the
//! environment `scripts/pydeps` makes) on the agent's and the
//! coordinator's unix sockets, with no channel options: grpc-core sends the
//! percent-encoded socket path as `:authority`, and its reflection client
//! speaks `grpc.reflection.v1alpha`.

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_tests::agent::*;
use cairn_tests::coordinator::CoordProc;

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run ./scripts/pydeps (./scripts/test does)",
        p.display()
    );
    p
}

fn stock_client(socket: &Path, service: &str, method: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/stock_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(socket)
        .args([service, method])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{service}/{method} on {}: {}",
        socket.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn python_grpcio_works_on_both_unix_sockets() {
    let (dir, _dom, agent) = AgentFixture::new(1).parts();
    let coord = CoordProc::of(dir.path(), &agent);
    let a = stock_client(&agent.socket, "cairn.agent.v1.Agent", "ListDomains");
    assert_eq!(a["health"], "SERVING", "{a}");
    assert!(
        a["services"]
            .as_array()
            .unwrap()
            .contains(&"cairn.agent.v1.Agent".into()),
        "{a}"
    );
    let domains = a["response"]["domains"].as_array().unwrap();
    assert_eq!(domains.len(), 1, "{a}");
    let c = stock_client(
        &coord.socket,
        "cairn.coordinator.v1.Coordinator",
        "ListAgents",
    );
    assert_eq!(c["health"], "SERVING", "{c}");
    let agents = c["response"]["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{c}");
    assert!(
        c.to_string().contains(domains[0]["id"].as_str().unwrap()),
        "{c}"
    );
}
