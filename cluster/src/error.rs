//! The cluster layer's errors. Lock service calls answer in the domain's
//! terms (`DomainError`: a lock timed out, a holder is fenced) with an etcd
//! failure kept as the source; the key-value store answers with these.

use cairn_domain::DomainError;

/// What a cluster store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd refused or could not be reached.
    #[error("{context}")]
    Etcd {
        /// What was being done.
        context: String,
        /// etcd's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The file store failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key that is not a `/`-separated path of plain names.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The session the store shares with the lock service failed.
    #[error(transparent)]
    Session(#[from] DomainError),
}

impl ClusterError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ClusterError::Etcd { .. } => "etcd",
            ClusterError::Io { .. } => "io",
            ClusterError::InvalidKey { .. } => "invalid_key",
            ClusterError::Session(d) => d.code().as_str(),
        }
    }

    pub(crate) fn etcd(context: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Self {
        let context = context.into();
        move |source| ClusterError::Etcd { context, source }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ClusterError::Io { context, source }
    }
}

/// Where a caller speaks the domain's terms: a bad key is an invalid
/// argument, any other failure a lock service failure with its cause.
impl From<ClusterError> for DomainError {
    fn from(e: ClusterError) -> DomainError {
        match e {
            ClusterError::InvalidKey { key, reason } => {
                DomainError::invalid("key", format!("{key:?}: {reason}"))
            }
            ClusterError::Session(d) => d,
            other => DomainError::Lock {
                context: "cluster store".into(),
                source: Box::new(other),
            },
        }
    }
}

/// Results of the cluster store.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_error_stays_the_source() {
        let e = ClusterError::etcd("writing k")(etcd_client::Error::InvalidArgs("x".into()));
        assert_eq!(e.code(), "etcd");
        let d = DomainError::from(e);
        assert!(matches!(d, DomainError::Lock { .. }), "{d}");
        let c = std::error::Error::source(&d).expect("the cluster error");
        let c = c.downcast_ref::<ClusterError>().expect("a ClusterError");
        assert_eq!(c.to_string(), "writing k");
        let inner = std::error::Error::source(c).expect("etcd's error");
        assert!(inner.downcast_ref::<etcd_client::Error>().is_some());
        let k = DomainError::from(ClusterError::InvalidKey {
            key: "../x".into(),
            reason: "not plain",
        });
        assert!(matches!(
            k,
            DomainError::InvalidArgument { field: "key", .. }
        ));
    }
}
