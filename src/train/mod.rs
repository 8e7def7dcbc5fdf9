//! (std) On-device training: forward caches, hand-written backward passes, losses,
//! optimisers, the continual-learning methods and KKT.

pub mod ops;
