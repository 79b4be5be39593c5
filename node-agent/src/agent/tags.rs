//! Tags, disks and user data.

use super::validate::*;
use super::*;

impl Agent {
    /// Create a tag.
    pub fn create_tag(
        &self,
        o: &Opened,
        volume: VolumeId,
        spec: &TagSpec,
        request_id: [u8; 16],
    ) -> Result<Tag> {
        validate_tag_spec(spec)?;
        let v = o.domain.read_volume(&volume)?;
        let mut out = o
            .domain
            .tx("create tag")
            .request_id(request_id)
            .create_tag(tag_meta(spec, VolumeRef::Existing(volume), v.capacity))
            .commit()?;
        Ok(out.tags.remove(0))
    }

    /// Replace a tag's metadata. Returns whether anything changed.
    pub fn change_tag(
        &self,
        o: &Opened,
        id: &TagId,
        volume: VolumeId,
        spec: &TagSpec,
        request_id: [u8; 16],
    ) -> Result<(Tag, bool)> {
        validate_tag_spec(spec)?;
        let t = o.domain.read_tag(id)?;
        let v = o.domain.read_volume(&volume)?;
        let meta = tag_meta(spec, VolumeRef::Existing(volume), v.capacity);
        if t.meta() == meta {
            return Ok((t, false));
        }
        o.domain
            .tx("change tag")
            .request_id(request_id)
            .change_tag(*id, meta)
            .commit()?;
        Ok((o.domain.read_tag(id)?, true))
    }

    /// Delete a tag; refused while it is active.
    pub fn delete_tag(&self, o: &Opened, id: &TagId, request_id: [u8; 16]) -> Result<()> {
        o.domain.read_tag(id)?;
        let name = id.to_string();
        if self.live_links(o)?.iter().any(|l| l.tag == name) {
            return Err(AgentError::InUse(format!(
                "tag {id} is active; deactivate it first"
            )));
        }
        o.domain
            .tx("delete tag")
            .request_id(request_id)
            .delete_tag(*id)
            .commit()?;
        Ok(())
    }

    /// Delete a tag and every volume and weak tag of its chain that nothing
    /// else references once it is gone, in one transaction. Refused while
    /// any of them is active.
    pub fn delete_disk(
        &self,
        o: &Opened,
        id: &TagId,
        request_id: [u8; 16],
    ) -> Result<(Vec<TagId>, Vec<VolumeId>)> {
        let lock = o.domain.lock_tag(id)?;
        let t = o.domain.read_tag(id)?;
        let plan = self.plan_delete_disk(o, &t)?;
        let links = self.live_links(o)?;
        if let Some(l) = links.iter().find(|l| {
            plan.0.iter().any(|t| t.to_string() == l.tag)
                || plan.1.iter().any(|v| v.to_string() == l.volume)
        }) {
            return Err(AgentError::InUse(format!(
                "volume {} of the disk is active under tag {}; deactivate it first",
                l.volume, l.tag
            )));
        }
        let mut tx = o
            .domain
            .tx("delete disk")
            .request_id(request_id)
            .wipe_deleted(wipes(&t));
        // Interleave as the chain goes: tag, its volume, the parent tag...
        let mut vols = plan.1.iter();
        for tag in &plan.0 {
            tx = tx.delete_tag(*tag);
            if let Some(v) = vols.next() {
                tx = tx.delete_volume(*v);
            }
        }
        tx.held(&[&lock]).commit()?;
        Ok(plan)
    }

    /// What deleting `t` takes with it: walk down the chain while each
    /// volume loses its last tag and each weak parent tag its last child.
    pub(crate) fn plan_delete_disk(
        &self,
        o: &Opened,
        t: &Tag,
    ) -> Result<(Vec<TagId>, Vec<VolumeId>)> {
        let mut tags = vec![t.id];
        let mut vols = Vec::new();
        let mut cur = t.clone();
        loop {
            let v = o.domain.read_volume(&cur.volume)?;
            if v.tag_refs > 1 {
                break; // another tag keeps the volume
            }
            vols.push(v.id);
            let Some(p) = v.parent else { break };
            let pt = o.domain.read_tag(&p)?;
            if pt.tag_type != TagType::Weak || pt.child_refs > 1 {
                break; // a strong tag, or another child, keeps the parent
            }
            tags.push(pt.id);
            cur = pt;
        }
        Ok((tags, vols))
    }

    /// Set a user data item; false if it already had this value.
    pub fn set_user_data(
        &self,
        o: &Opened,
        id: &TagId,
        name: &str,
        data: Vec<u8>,
        request_id: [u8; 16],
    ) -> Result<bool> {
        validate_item_name(name)?;
        if o.domain.read_user_data(id)?.get(name) == Some(&data) {
            return Ok(false);
        }
        o.domain
            .tx("set user data")
            .request_id(request_id)
            .set_user_data(TagRef::Existing(*id), name, data)
            .commit()?;
        Ok(true)
    }

    /// Read user data items (one, or all when `name` is empty).
    pub fn get_user_data(&self, o: &Opened, id: &TagId, name: &str) -> Result<UserData> {
        let mut all = o.domain.read_user_data(id)?;
        if name.is_empty() {
            return Ok(all);
        }
        validate_item_name(name)?;
        match all.remove_entry(name) {
            Some((k, v)) => Ok(UserData::from([(k, v)])),
            None => Err(AgentError::not_found(
                "user data item",
                format!("{name} of tag {id}"),
            )),
        }
    }

    /// Remove a user data item; false if there was none.
    pub fn remove_user_data(
        &self,
        o: &Opened,
        id: &TagId,
        name: &str,
        request_id: [u8; 16],
    ) -> Result<bool> {
        validate_item_name(name)?;
        if !o.domain.read_user_data(id)?.contains_key(name) {
            return Ok(false);
        }
        o.domain
            .tx("remove user data")
            .request_id(request_id)
            .remove_user_data(*id, name)
            .commit()?;
        Ok(true)
    }
}
