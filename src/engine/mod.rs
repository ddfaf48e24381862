//! The generic engine: the backend contract, the driver loop, sizing, stopping, and running one
//! job against any backend and state store.

mod backend;
mod driver;
mod job;
mod sizer;
mod stop;
mod throttle;

pub use backend::{Backend, Estimate, Outcome, Sample, Timings};
pub use driver::drive;
pub use job::{JobReport, Ran, RunOptions, run_with};
pub use sizer::Sizer;
pub use stop::Stop;
pub use throttle::{Gate, Probe};
