//! The image calls: messages in, domain types to the coordinator,
//! messages out; every change audited.

use cairn_domain::{Allocation, Format};
use tonic::{Request, Response, Status};

use super::{outcome, to_status, Caller, CoordService, R};
use crate::catalog::glance;
use crate::catalog::image_ops::Found;
use crate::catalog::images::{Change, Register};
use crate::catalog::store::DataItem;
use crate::error::CoordError;
use crate::jobs::image::{plan_from_image, Ask};
use crate::jobs::JobSpec;
use crate::pb;
use cairn_proto::auth::Identity;
use cairn_proto::peer::audit;

/// An image as a message.
pub fn pb_image(i: &Found) -> pb::Image {
    let r = &i.record;
    pb::Image {
        id: r.id.clone(),
        name: r.name.clone(),
        owner: r.owner.clone(),
        location: r.location.clone(),
        checksum: r.checksum.clone(),
        container_format: r.container_format.clone(),
        disk_format: r.disk_format.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        is_public: r.is_public,
        properties: r.properties.clone().into_iter().collect(),
        size: r.size,
        status: r.status.clone(),
        domain: crate::catalog::domain_name(&i.domain),
        path: i.file.path.clone(),
        file_version: i.file.version,
        names: r.names.clone(),
        metadata: r.metadata.clone(),
        flags: r.flags.clone().into_iter().collect(),
        data: i.data.iter().map(pb_data).collect(),
        visibility: glance::visibility(r).into(),
        members: r
            .members
            .iter()
            .map(|(m, s)| pb::ImageMember {
                member: m.clone(),
                status: s.clone(),
            })
            .collect(),
        protected: r.protected,
        tags: r.tags.clone(),
        min_disk: r.min_disk,
        min_ram: r.min_ram,
        virtual_size: r.virtual_size,
        os_hash_algo: glance::OS_HASH_ALGO.into(),
        os_hash_value: r.checksum.clone(),
    }
}

/// A data item as a message.
pub fn pb_data(d: &DataItem) -> pb::ImageData {
    pb::ImageData {
        key: d.key.clone(),
        size: d.size,
        sha256: d.sha256.clone(),
    }
}

impl CoordService {
    pub(super) async fn register(
        &self,
        r: Request<pb::RegisterImageRequest>,
    ) -> R<pb::RegisterImageResponse> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let req = Register {
            name: r.name.clone(),
            properties: r.properties.clone().into_iter().collect(),
            template: r.metafile.clone(),
            public: r.public,
            disk_format: r.disk_format.clone(),
            container_format: r.container_format.clone(),
            id: r.image_id.clone(),
            names: r.names.clone(),
            metadata: r.metadata.clone(),
            version: None,
        };
        let done = self
            .coord
            .register_image(
                &who.id,
                &r.request_id,
                &r.location,
                &req,
                r.force,
                r.no_metafile_upload,
            )
            .await;
        audit(&who.peer, "register_image", &r.request_id, &outcome(&done));
        let reg = done.map_err(|e| to_status(&e))?;
        let (metafile_location, metafile_version) = match &reg.metafile {
            Some(m) => (
                format!("{}:{}", pb_image(&reg.image).domain, m.path),
                m.version,
            ),
            None => (String::new(), 0),
        };
        Ok(Response::new(pb::RegisterImageResponse {
            image: Some(pb_image(&reg.image)),
            metafile_location,
            metafile_version,
        }))
    }

    pub(super) async fn images(
        &self,
        who: &Identity,
        r: pb::ListImagesRequest,
    ) -> R<pb::ListImagesResponse> {
        let since = r.since;
        let l = self
            .coord
            .list_images(who, &r.owner, &since)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListImagesResponse {
            images: l.images.iter().map(pb_image).collect(),
            problems: l.problems,
            generations: l
                .domains
                .iter()
                .map(|(d, g, changes)| pb::CatalogGeneration {
                    domain_id: d.id.to_string(),
                    domain: d.name.clone(),
                    generation: *g,
                    changes: *changes,
                })
                .collect(),
            removed_image_ids: l.removed,
        }))
    }

    pub(super) async fn image(&self, who: &Identity, id: &str) -> R<pb::Image> {
        let i = self
            .coord
            .get_image(who, id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_image(&i)))
    }

    pub(super) async fn change_image(&self, r: Request<pb::UpdateImageRequest>) -> R<pb::Image> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let c = Change {
            set: r.set.clone().into_iter().collect(),
            clear: r.clear.clone(),
            set_properties: r.set_properties.clone().into_iter().collect(),
            remove_properties: r.remove_properties.clone(),
            public: r.public,
            set_flags: r.set_flags.clone().into_iter().collect(),
            clear_flags: r.clear_flags.clone(),
            add_tags: r.add_tags.clone(),
            remove_tags: r.remove_tags.clone(),
            add_members: r.add_members.clone(),
            remove_members: r.remove_members.clone(),
        };
        let done = self
            .coord
            .update_image(&who.id, &r.request_id, &r.image_id, &c)
            .await;
        audit(&who.peer, "update_image", &r.request_id, &outcome(&done));
        let i = done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb_image(&i)))
    }

    pub(super) async fn unregister(
        &self,
        r: Request<pb::UnregisterImageRequest>,
    ) -> R<pb::UnregisterImageResponse> {
        let (who, r) = (Caller::of(&r)?, r.into_inner());
        let done = self
            .coord
            .unregister_image(&who.id, &r.request_id, &r.image_id)
            .await;
        audit(
            &who.peer,
            "unregister_image",
            &r.request_id,
            &outcome(&done),
        );
        done.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::UnregisterImageResponse {
            unregistered: true,
        }))
    }
}

impl CoordService {
    /// A disk made from an image the caller may see (see
    /// [`crate::jobs::FromImage`]): the image is resolved first, then the
    /// job goes through [`CoordService::submit`] like any other.
    pub(super) async fn create_from_image(
        &self,
        mut r: Request<pb::CreateDiskRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = Caller::of(&r)?;
        let req = r.get_ref();
        let early = || -> Result<(), CoordError> {
            if !matches!(
                super::convert::format_of(req.format)?,
                None | Some(Format::Qcow2)
            ) {
                return Err(CoordError::invalid(
                    "format",
                    "a disk from an image is a qcow2 layer on it; leave format unset",
                ));
            }
            if super::convert::allocation_of(req.allocation)? != Allocation::Sparse {
                return Err(CoordError::invalid(
                    "allocation",
                    "a disk from an image is a thin layer on it; leave allocation unset",
                ));
            }
            Ok(())
        };
        early().map_err(|e| to_status(&e))?;
        let found = self
            .coord
            .get_image(&who.id, &req.from_image)
            .await
            .map_err(|e| to_status(&e))?;
        if req.domain.is_empty() {
            r.get_mut().domain = found.domain.id.to_string();
        }
        self.submit(r, move |r, domain, _| {
            let ask = Ask {
                size: r.size,
                name: r.name.clone(),
                description: r.description.clone(),
                wipe_after_delete: r.wipe_after_delete,
            };
            let plan = plan_from_image(domain, found.domain.id, &found.record, &found.file, &ask)?;
            Ok(JobSpec::FromImage(plan))
        })
        .await
    }
}
