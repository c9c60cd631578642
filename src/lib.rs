//! Tooling that ships in the `orderflow` binary beside the API and the workers:
//! the invariant audit and the benchmark.

pub mod audit;
pub mod bench;
