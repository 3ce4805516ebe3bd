pub mod consumers;
pub mod core;
pub mod handle;
