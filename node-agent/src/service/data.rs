//! The streaming data calls: bytes into a volume being made, and out of a
//! legal one. Device I/O runs on blocking threads: one writes while the next
//! messages arrive, one reads a chunk ahead of the client.

use cairn_domain::io::AlignedBuf;
use cairn_proto::convert::volume_id;
use tonic::Streaming;

use super::*;
use crate::agent::data::{read_chunk, CHUNK};
use crate::agent::FileRead;

/// The stream `ReadVolumeData` answers with.
pub type DataStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::VolumeDataChunk, Status>> + Send + 'static>,
>;

impl AgentService {
    /// `WriteVolumeData`: the first message opens the writer, every
    /// message's data follows in order, the end makes it durable.
    pub(super) async fn write_data(
        &self,
        mut s: Streaming<pb::WriteVolumeDataRequest>,
    ) -> Result<pb::WriteVolumeDataResponse, Status> {
        let first = s.message().await?.ok_or_else(|| {
            to_status(&AgentError::invalid(
                "volume_id",
                "the stream ended before its first message named the volume",
            ))
        })?;
        // The checksum is taken here, beside the writes, as the bytes pass.
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        sha.update(&first.data);
        let whole = (first.offset == 0).then(|| first.lock_id.clone());
        let w = self
            .run("write_volume_data", move |a| {
                let o = a.domain(&first.domain)?;
                let id = volume_id("volume_id", &first.volume_id)?;
                let mut w = a.volume_writer(&o, &id, &first.lock_id, first.offset)?;
                w.write(&first.data)?;
                Ok(w)
            })
            .await?;
        // One thread writes while the next messages arrive; it stops at the
        // first refusal, which is the call's answer.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let writer = self.run("write_volume_data", move |_| {
            let mut w = w;
            while let Some(data) = rx.blocking_recv() {
                w.write(&data)?;
            }
            w.finish()
        });
        let feed = async move {
            while let Some(m) = s.message().await? {
                sha.update(&m.data);
                if tx.send(m.data).await.is_err() {
                    break; // the writer refused: its error is the answer
                }
            }
            Ok::<_, Status>(sha.finish())
        };
        let (fed, written) = tokio::join!(feed, writer);
        let bytes_written = written?;
        let sha256 = cairn_proto::auth::hex(fed?.as_ref());
        if let Some(lock_id) = whole {
            self.agent
                .note_written(&lock_id, bytes_written, sha256.clone());
        }
        Ok(pb::WriteVolumeDataResponse {
            bytes_written,
            sha256,
        })
    }

    /// `ReadVolumeData`: checked at once (a refusal is the call's status),
    /// then read chunk by chunk as the client takes them.
    pub(super) async fn read_data(
        &self,
        r: pb::ReadVolumeDataRequest,
    ) -> Result<DataStream, Status> {
        let offset = r.offset;
        let (file, start, length, sector) = self
            .run("read_volume_data", move |a| {
                let o = a.domain(&r.domain)?;
                let id = volume_id("volume_id", &r.volume_id)?;
                let (f, start, len) = a.volume_reader(&o, &id, r.offset, r.length)?;
                Ok((f, start, len, o.domain.geometry().sector_size as usize))
            })
            .await?;
        Ok(stream_device(file, start, offset, length, sector))
    }

    /// `ReadFile`: a small file's bytes in one chunk, a volume's as
    /// `ReadVolumeData` reads them.
    pub(super) async fn read_file(&self, r: pb::ReadFileRequest) -> Result<DataStream, Status> {
        let offset = r.offset;
        let (read, sector) = self
            .run("read_file", move |a| {
                let o = a.domain(&r.domain)?;
                let id = cairn_proto::convert::tag_id("tag_id", &r.tag_id)?;
                let read = a.file_reader(&o, &id, r.offset, r.length)?;
                Ok((read, o.domain.geometry().sector_size as usize))
            })
            .await?;
        Ok(match read {
            FileRead::Inline(data) => Box::pin(tokio_stream::iter([Ok(pb::VolumeDataChunk {
                offset,
                data,
            })])),
            FileRead::Volume(file, start, length) => {
                stream_device(file, start, offset, length, sector)
            }
        })
    }
}

/// Read `length` bytes of `file` from device offset `start` (volume offset
/// `offset`) chunk by chunk, a chunk ahead of the client.
fn stream_device(
    file: std::fs::File,
    start: u64,
    offset: u64,
    length: u64,
    sector: usize,
) -> DataStream {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut buf = AlignedBuf::zeroed(CHUNK);
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(CHUNK as u64) as usize;
            let chunk = read_chunk(&file, start + done, &mut buf, n, sector)
                .map(|()| pb::VolumeDataChunk {
                    offset: offset + done,
                    data: buf[..n].to_vec(),
                })
                .map_err(|e| to_status(&e));
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return; // the client went away, or it has the error
            }
            done += n as u64;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
