//! The health evaluator: liveness, scores, tiers and incidents.
//!
//! The decisions are pure functions of their inputs, `now` included
//! ([`liveness`], [`phi`], [`score`], [`flap`], [`trend`]); the evaluator
//! ([`evaluator`]) reads the fleet in bulk, applies them, and writes the
//! results back in one transaction per cycle.

pub mod evaluator;
pub mod flap;
pub mod incidents;
pub mod liveness;
pub mod phi;
pub mod removal;
pub mod score;
pub mod stats;
