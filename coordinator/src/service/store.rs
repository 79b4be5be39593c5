//! The image store's calls (seed 004): messages in, domain types to the
//! coordinator, messages out; every change audited.

use tonic::{Request, Response, Streaming};

use super::files::{file_stream, headed, FileStream};
use super::images::{pb_data, pb_image};
use super::{outcome, to_status, Caller, CoordService, R};
use crate::catalog::store_ops::DataUpload;
use crate::pb;
use cairn_proto::auth::Identity;
use cairn_proto::peer::audit;

impl CoordService {
    pub(super) async fn names(&self, r: Request<pb::SetImageNamesRequest>) -> R<pb::Image> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .set_image_names(&who.id, &r.request_id, &r.image_id, &r.names)
            .await;
        audit(&who.peer, "set_image_names", &r.request_id, &outcome(&done));
        let i = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_image(&i)))
    }

    pub(super) async fn put_data(
        &self,
        r: Request<Streaming<pb::SetImageDataRequest>>,
    ) -> R<pb::SetImageDataResponse> {
        let who = Caller::of(&r)?;
        let (h, data) = headed(r.into_inner()).await?;
        let up = DataUpload {
            request_id: h.request_id,
            image: h.image_id,
            key: h.key,
            size: h.size,
            sha256: h.sha256,
        };
        let done = self.coord.set_image_data(&who.id, &up, data).await;
        audit(&who.peer, "set_image_data", &up.request_id, &outcome(&done));
        let (_, item, created) = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::SetImageDataResponse {
            item: Some(pb_data(&item)),
            created,
        }))
    }

    pub(super) async fn data(&self, who: &Identity, r: pb::GetImageDataRequest) -> R<FileStream> {
        let (_, _, chunks) = self
            .coord
            .get_image_data(who, &r.image_id, &r.key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(file_stream(chunks)))
    }

    pub(super) async fn remove_data(
        &self,
        r: Request<pb::RemoveImageDataRequest>,
    ) -> R<pb::RemoveImageDataResponse> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .remove_image_data(&who.id, &r.request_id, &r.image_id, &r.key)
            .await;
        audit(
            &who.peer,
            "remove_image_data",
            &r.request_id,
            &outcome(&done),
        );
        done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RemoveImageDataResponse { removed: true }))
    }

    pub(super) async fn member_status(
        &self,
        r: Request<pb::SetImageMemberStatusRequest>,
    ) -> R<pb::Image> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .set_member_status(&who.id, &r.request_id, &r.image_id, &r.status)
            .await;
        audit(
            &who.peer,
            "set_image_member_status",
            &r.request_id,
            &outcome(&done),
        );
        let i = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_image(&i)))
    }

    pub(super) async fn wipe(
        &self,
        r: Request<pb::WipeImagesRequest>,
    ) -> R<pb::WipeImagesResponse> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .wipe_images(&who.id, &r.request_id, &r.domain)
            .await;
        audit(&who.peer, "wipe_images", &r.request_id, &outcome(&done));
        let image_ids = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::WipeImagesResponse { image_ids }))
    }
}
