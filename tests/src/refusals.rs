//! Tables of requests that must be refused: each with the status code it
//! must get and the field its error must name; checked all at once, so a
//! failure lists every wrong case.

use tonic_types::StatusExt;

/// What one refused request must look like.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// What the case is, for the report.
    pub name: &'static str,
    /// The status code it must get.
    pub code: tonic::Code,
    /// The field its message and BadRequest details must name.
    pub field: Option<&'static str>,
}

/// Refusals collected so far.
#[derive(Debug, Default)]
pub struct Refusals {
    cases: Vec<(Expect, tonic::Status)>,
}

impl Refusals {
    /// Await `call`, which must fail as `name` with `code` naming `field`.
    pub async fn expect<T>(
        &mut self,
        name: &'static str,
        code: tonic::Code,
        field: Option<&'static str>,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) {
        match call.await {
            Ok(_) => panic!("{name} succeeded"),
            Err(st) => self.cases.push((Expect { name, code, field }, st)),
        }
    }

    /// How many cases there are.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Panic listing every case whose code, error info or named field is
    /// not what it must be.
    pub fn verify(&self) {
        let mut bad = Vec::new();
        for (e, st) in &self.cases {
            if st.code() != e.code {
                bad.push(format!(
                    "{}: {:?} ({}) instead of {:?}",
                    e.name,
                    st.code(),
                    st.message(),
                    e.code
                ));
                continue;
            }
            if st.get_details_error_info().is_none() {
                bad.push(format!("{}: no error info", e.name));
            }
            if let Some(f) = e.field {
                let br = st.get_details_bad_request();
                let named = br
                    .as_ref()
                    .is_some_and(|b| b.field_violations.iter().any(|v| v.field == f));
                if !named || !st.message().contains(f) {
                    bad.push(format!(
                        "{}: field {f} not named in {:?} / {:?}",
                        e.name,
                        st.message(),
                        br
                    ));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} of {} cases wrong:\n{}",
            bad.len(),
            self.cases.len(),
            bad.join("\n")
        );
    }
}
