//! arcfed-lab: real Kubernetes API servers and real ARC, built from their Go modules by
//! `tests/peers/build.sh`, for the checks our models cannot make (see docs/lab.md).
//!
//! ```text
//!  peers     where the built peers are; skip-or-fail when they are missing
//!  cluster   one cluster: etcd + kube-apiserver + kube-controller-manager, its PKI, kubectl
//!  install   install-check: deploy/README.md's steps, placement, admission, ARC's chart
//!  net       the pod network: a bridge per lab, a network namespace per pod
//!  kubelet   a kubelet stand-in: binds pods to its node, runs containers as processes
//!  arc       ARC's controller and a scale set installed from ARC's charts; arcfed's agent side
//!  runner    the runner image's program: one job at the emulator, then exit 0
//!  seed      seed-compare: ARC's own listener vs arcfed's agent, same world, same faults
//! ```
pub mod arc;
pub mod cluster;
pub mod install;
pub mod kubelet;
pub mod net;
pub mod peers;
pub mod runner;
pub mod seed;
