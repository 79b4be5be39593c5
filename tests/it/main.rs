//! Cairn's integration tests: one test binary.
//!
//! Test names mark what they need: `root_` (loop devices), `slow_` (long
//! runs), `etcd_` (a real etcd server), `qemu_` (qemu-img or qemu-io).
//! The fixtures are the test kit, `cairn_tests`.

mod activation;
mod api_errors;
mod auth;
mod bitflip;
mod boundary;
mod cli;
mod coordinator;
mod crash;
mod datapath;
mod etcd;
mod failover;
mod files;
mod from_disk;
mod from_image;
mod glance;
mod image_store;
mod images;
mod kill_loop;
mod multiprocess;
mod python;
mod tls;
mod volumes;
