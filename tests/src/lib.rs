//! Cairn's test kit: fixtures for real components and helpers, used by
//! the integration tests (`tests/it`), the benchmarks (`tests/benches`)
//! and the `cairn-torture` helper.
//!
//! - [`bins`]: the workspace's binaries, built on first use;
//! - [`domain`]: domains in files, formatting parameters, checks;
//! - [`agent`], [`coordinator`]: real processes and clients;
//! - [`ask`]: typed client helpers, one line per common call;
//! - [`auth`], [`certs`]: token files, certificates, clients as someone;
//! - [`etcd`]: a real etcd on loopback;
//! - [`cluster`]: etcd, agents on one domain and coordinators together;
//! - [`data`]: files of known patterns and what images read like;
//! - [`refusals`]: tables of requests that must be refused, checked at once;
//! - [`stats`]: percentiles, medians and a seeded generator.
#![warn(missing_docs)]

pub mod agent;
pub mod ask;
pub mod auth;
pub mod bins;
pub mod certs;
pub mod cluster;
pub mod coordinator;
pub mod data;
pub mod domain;
pub mod etcd;
pub mod refusals;
pub mod stats;

/// A gRPC answer the test expects to succeed.
pub trait Answer<T> {
    /// The message; panics with the status otherwise.
    fn answer(self) -> T;
    /// The status of a call that must be refused with `code` and a
    /// message containing `text`; panics otherwise.
    fn refused(self, code: tonic::Code, text: &str) -> tonic::Status;
}

impl<T> Answer<T> for Result<tonic::Response<T>, tonic::Status> {
    #[track_caller]
    fn answer(self) -> T {
        match self {
            Ok(r) => r.into_inner(),
            Err(s) => panic!("the call failed: {s:?}"),
        }
    }

    #[track_caller]
    fn refused(self, code: tonic::Code, text: &str) -> tonic::Status {
        let Err(e) = self else {
            panic!("the call succeeded; expected {code:?} saying {text:?}")
        };
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(text),
            "{text:?} not in {:?}",
            e.message()
        );
        e
    }
}

/// The last message of a watch (a job's end state); panics when the stream
/// fails or ends empty.
pub async fn last<T>(watch: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> T {
    let mut s = watch.answer();
    let mut last = None;
    while let Some(m) = s.message().await.unwrap() {
        last = Some(m);
    }
    last.expect("a watched job reports at least once")
}
