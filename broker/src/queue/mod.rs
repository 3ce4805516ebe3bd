pub mod consumers;
pub mod core;
