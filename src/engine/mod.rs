//! The generic engine: the backend contract, the per-worker driver loop, sizing, stopping, run
//! windows, throttling, and running one job with its workers against any backend.

mod backend;
mod driver;
pub mod exit_now;
#[cfg(test)]
mod fake;
mod job;
pub mod plan;
mod sizer;
mod stop;
mod throttle;
pub mod window;

pub use backend::{Backend, Claim, Estimate, Outcome, Sample, Start, Timings, Worker};
pub use job::{JobReport, Ran, RunOptions, run_job};
pub use sizer::Sizer;
pub use stop::Stop;
pub use throttle::{Gate, Probe};
