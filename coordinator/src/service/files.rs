//! The catalog's file calls: messages in, domain types to the
//! coordinator, messages out; every change audited.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{outcome, Caller, CoordService, R};
use crate::catalog::files::Upload;
use crate::catalog::Location;
use crate::error::CoordError;
use crate::pb;
use crate::plan::DomainRef;
use cairn_domain::catalog::FileVersion;
use cairn_proto::auth::Identity;
use cairn_proto::peer::audit;

use super::to_status;

/// The stream `ReadFile` answers with.
pub type FileStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

/// A file's chunks as `ReadFile` answers them.
pub(super) fn file_stream(chunks: crate::agents::Chunks) -> FileStream {
    Box::pin(chunks.map(|c| {
        c.map(|c| pb::FileChunk {
            offset: c.offset,
            data: c.data,
        })
    }))
}

/// A file version as a message; its location names the domain by name.
pub fn pb_file(d: &DomainRef, f: &FileVersion) -> pb::File {
    let domain = crate::catalog::domain_name(d);
    pb::File {
        location: Location::full(&f.owner, &domain, &f.path),
        domain,
        path: f.path.clone(),
        owner: f.owner.clone(),
        version: f.version,
        size: f.size,
        sha256: f.sha256.clone(),
        created: f.created,
        directory: f.directory,
        image: f.image.clone().unwrap_or_default(),
    }
}

/// A listing's answer (ListFiles, FileVersions).
pub(super) fn listed(
    r: Result<(DomainRef, u64, Vec<FileVersion>), CoordError>,
) -> R<pb::ListFilesResponse> {
    let (d, generation, files) = r.map_err(|e| to_status(&e))?;
    Ok(Response::new(pb::ListFilesResponse {
        files: files.iter().map(|f| pb_file(&d, f)).collect(),
        generation,
    }))
}

/// A client stream whose first message carries a header and every
/// message bytes.
pub(super) trait Headed: Default + Send + 'static {
    /// The header.
    type Header;
    /// The header (first message only) and the bytes.
    fn split(self) -> (Option<Self::Header>, Vec<u8>);
}

impl Headed for pb::UploadFileRequest {
    type Header = pb::UploadHeader;
    fn split(self) -> (Option<pb::UploadHeader>, Vec<u8>) {
        (self.header, self.data)
    }
}

impl Headed for pb::SetImageDataRequest {
    type Header = pb::ImageDataHeader;
    fn split(self) -> (Option<pb::ImageDataHeader>, Vec<u8>) {
        (self.header, self.data)
    }
}

/// The bytes of a client stream, as the coordinator takes them.
pub(super) type Bytes =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Vec<u8>, CoordError>> + Send>>;

/// The header of stream `s` and its bytes (the first message's too); a
/// header later on, or the stream failing, ends the bytes with an error.
pub(super) async fn headed<M: Headed>(mut s: Streaming<M>) -> Result<(M::Header, Bytes), Status> {
    let (h, first) = s.message().await?.unwrap_or_default().split();
    let Some(h) = h else {
        let e = CoordError::invalid("header", "the first message carries it");
        return Err(to_status(&e));
    };
    let rest = s.map(|m| match m.map(M::split) {
        Ok((Some(_), _)) => Err(CoordError::invalid(
            "header",
            "only the first message carries it",
        )),
        Ok((None, data)) => Ok(data),
        Err(e) => Err(CoordError::invalid(
            "data",
            format!("the stream failed: {}", e.message()),
        )),
    });
    Ok((h, Box::pin(tokio_stream::once(Ok(first)).chain(rest))))
}

impl CoordService {
    pub(super) async fn upload(
        &self,
        r: Request<Streaming<pb::UploadFileRequest>>,
    ) -> R<pb::UploadFileResponse> {
        let who = Caller::of(&r)?;
        let (h, data) = headed(r.into_inner()).await?;
        let up = Upload {
            request_id: h.request_id,
            location: h.location,
            size: h.size,
            sha256: h.sha256,
            directory: h.directory,
        };
        let done = self.coord.upload_file(&who.id, &up, data).await;
        audit(&who.peer, "upload_file", &up.request_id, &outcome(&done));
        let (d, f, created) = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UploadFileResponse {
            file: Some(pb_file(&d, &f)),
            created,
        }))
    }

    pub(super) async fn read(&self, who: &Identity, r: pb::ReadFileRequest) -> R<FileStream> {
        let (_, _, chunks) = self
            .coord
            .read_file(who, &r.location, r.version)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(file_stream(chunks)))
    }

    pub(super) async fn delete(
        &self,
        r: Request<pb::DeleteFileRequest>,
    ) -> R<pb::DeleteFileResponse> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .delete_file(&who.id, &r.request_id, &r.location, r.version)
            .await;
        audit(&who.peer, "delete_file", &r.request_id, &outcome(&done));
        let versions = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::DeleteFileResponse {
            deleted: !versions.is_empty(),
            versions,
        }))
    }
}
