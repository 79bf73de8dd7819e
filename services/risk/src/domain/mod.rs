//! What decides a color: facts about a person, the province's policy, and the pure
//! evaluation that turns the one into a color with the other. Nothing here does I/O.

pub mod areas;
pub mod evaluate;
pub mod facts;
pub mod policy;
pub mod time;
