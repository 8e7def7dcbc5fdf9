//! (std) On-device training: forward caches, hand-written backward passes, losses,
//! optimisers, the continual-learning methods and KKT.

pub mod mask;
pub mod method;
pub mod model;
pub mod net;
pub mod ops;
pub mod optim;
