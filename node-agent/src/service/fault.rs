//! Fault injection for crash tests: an agent that dies right after a
//! method's change is committed, before it answers, as a host crashing at
//! that point would.

/// The environment variable that names methods (comma-separated) after
/// whose commit the agent process dies without answering. For crash tests
/// only; unset in any real deployment.
pub const FAULT_ENV: &str = "CAIRN_FAULT_EXIT_AFTER_COMMIT";

/// The methods this process dies after.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    exit_after: Vec<String>,
}

impl Faults {
    /// What [`FAULT_ENV`] asks for (nothing when unset).
    pub(crate) fn from_env() -> Faults {
        let exit_after: Vec<String> = std::env::var(FAULT_ENV)
            .unwrap_or_default()
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        if !exit_after.is_empty() {
            tracing::warn!(methods = ?exit_after, "fault injection: this agent dies after a commit");
        }
        Faults { exit_after }
    }

    /// Die here if `method` is one to die after.
    pub(crate) fn after_commit(&self, method: &str, request_id: &str) {
        if self.exit_after.iter().any(|m| m == method) {
            tracing::error!(
                method,
                request_id,
                "fault injection: dying after the commit"
            );
            // SAFETY: ends this process at once, as a crash would: no
            // destructors, no answer, no slot released.
            unsafe { libc::_exit(137) };
        }
    }
}
