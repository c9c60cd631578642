//! Tooling that ships in the `orderflow` binary beside the API and the workers: the invariant
//! audit and event replays. (The benchmark is its own crate, `orderflow-bench`, in `bench/`.)

pub mod audit;
pub mod events;
