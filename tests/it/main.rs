//! Cairn's integration tests: one test binary.
//!
//! Test names mark what they need: `root_` (loop devices), `slow_` (long
//! runs), `etcd_` (a real etcd server).

mod agent;
mod agent_harness;
mod bitflip;
mod cli;
mod cluster;
mod common;
mod coord_harness;
mod coordinator;
mod crash;
mod datapath;
mod etcd;
mod multiprocess;
