//! Tag options with a meaning to Cairn itself. Agents and coordinators of
//! every version read and write them; they are part of the protocol.

/// A disk's name for people.
pub const NAME: &str = "cairn.name";
/// The coordinator job that made a disk: a retry or an adopting leader
/// finds what a job made by it.
pub const JOB: &str = "cairn.job";
/// The disk a clone was made from.
pub const CLONE_OF: &str = "cairn.clone-of";
/// On the copy a conversion makes before it takes the disk's place: the
/// disk. Such a tag is not a disk of its own.
pub const CONVERT_OF: &str = "cairn.convert-of";
/// On a snapshot's weak tag: its description.
pub const SNAPSHOT_DESCRIPTION: &str = "cairn.description";
/// On a disk: the identity that owns it (a `user` may act only on its
/// own disks; a disk without one is for admin and service identities).
/// A snapshot belongs to the owner of the disk it is of.
pub const OWNER: &str = "cairn.owner";
/// On a disk: `true` when deleting it (and converting it) zeroes or
/// discards the extents of the volumes that go, before they are freed.
pub const WIPE_AFTER_DELETE: &str = "cairn.wipe-after-delete";
/// On a snapshot's weak tag: the disk it is a snapshot of.
pub const SNAPSHOT_OF: &str = "cairn.snapshot-of";
/// On a disk made from an image: the image's id.
pub const FROM_IMAGE: &str = "cairn.from-image";
/// `cairn.kind` of a domain's copy of an image another domain holds, or
/// of an image whose bytes are not a disk's (qcow2): the base its disks
/// are thin layers on. It is no disk and no file.
pub const KIND_IMAGE_CACHE: &str = "image-cache";
/// On an image cache: the image's id.
pub const CACHE_IMAGE: &str = "cairn.cache.image";
/// On an image cache: the domain of the image's file.
pub const CACHE_DOMAIN: &str = "cairn.cache.domain";
/// On an image cache: the tag of the file version it is a copy of.
pub const CACHE_BASE: &str = "cairn.cache.base";
/// On an image cache: the coordinator job that made it.
pub const CACHE_JOB: &str = "cairn.cache.job";

/// On the snapshot an image-from-disk job makes: the job's id. The job
/// merges it away at its end; the leader does when the job could not
/// (it failed, or the disk was active).
pub const IMAGE_SNAPSHOT_JOB: &str = "cairn.image-snapshot.job";
